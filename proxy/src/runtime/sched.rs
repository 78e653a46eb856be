//! `--sched-policy`: the Linux scheduling policy of the proxy's threads.
#![allow(unsafe_code)]

use std::io;

/// Puts the calling thread under `SCHED_BATCH`; threads it starts afterwards inherit the policy.
/// Needs no privilege: any thread may move itself between `SCHED_OTHER` and `SCHED_BATCH`.
pub fn use_batch() -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` outlives the call, which only reads it; pid 0 is the calling thread.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The policy of the calling thread: field 41 of /proc/thread-self/stat (0 is SCHED_OTHER,
    /// 3 is SCHED_BATCH).
    fn policy() -> u32 {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        // Fields 3 and on follow the parenthesised command name, which may hold spaces.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        rest.split(' ').nth(41 - 3).unwrap().parse().unwrap()
    }

    #[test]
    fn batch_holds_for_the_thread_and_the_threads_it_starts() {
        let before = policy();
        let (own, child) = std::thread::spawn(|| {
            use_batch().unwrap();
            let child = std::thread::spawn(policy).join().unwrap();
            (policy(), child)
        })
        .join()
        .unwrap();
        assert_eq!((own, child), (3, 3));
        assert_eq!(policy(), before, "other threads keep their policy");
    }
}
