//! A cluster DNS server for one test pod: the namespace's resolver, as a pod's is.
//!
//! `ip netns exec` mounts the files in `/etc/netns/<namespace>/` over those in `/etc`, so every
//! program a test starts with [`NetNs::command`] reads the `resolv.conf` written here: this
//! server on the pod's loopback, the pod's search list and `ndots:5`, as the kubelet writes it.
//! The server answers A queries for the names it was given, with no address for their AAAA
//! queries, and NXDOMAIN for every other name, as CoreDNS answers the search list's misses.

use std::net::{Ipv4Addr, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::NetNs;

/// Where the server listens inside the namespace (UDP, port 53).
pub const ADDRESS: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 53);

const TYPE_A: u16 = 1;
const CLASS_IN: u16 = 1;
const NXDOMAIN: u16 = 3;

pub struct DnsServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    etc: PathBuf,
    queries: Arc<Mutex<Vec<String>>>,
}

impl DnsServer {
    /// Serves `records` (fully qualified names, without the final dot) to `ns`, whose resolver
    /// it becomes with `search` as the search list.
    pub fn start(ns: &NetNs, search: &[&str], records: &[(&str, Ipv4Addr)]) -> Result<Self> {
        let etc = PathBuf::from("/etc/netns").join(ns.name());
        std::fs::create_dir_all(&etc).with_context(|| format!("creating {}", etc.display()))?;
        std::fs::write(
            etc.join("resolv.conf"),
            format!(
                "nameserver {ADDRESS}\nsearch {}\noptions ndots:5\n",
                search.join(" ")
            ),
        )?;
        let socket = ns.run_in(|| UdpSocket::bind((ADDRESS, 53)))??;
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let queries = Arc::new(Mutex::new(Vec::new()));
        let records: Vec<(String, Ipv4Addr)> = records
            .iter()
            .map(|(name, ip)| (name.to_ascii_lowercase(), *ip))
            .collect();
        let thread = std::thread::spawn({
            let (stop, queries) = (stop.clone(), queries.clone());
            move || {
                let mut buf = [0u8; 512];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((len, from)) = socket.recv_from(&mut buf) else {
                        continue;
                    };
                    let Some((name, qtype, question_end)) = question(&buf[..len]) else {
                        continue;
                    };
                    queries.lock().unwrap().push(name.clone());
                    let found = records.iter().find(|(known, _)| *known == name);
                    let answer = found.filter(|_| qtype == TYPE_A).map(|(_, ip)| *ip);
                    let rcode = if found.is_some() { 0 } else { NXDOMAIN };
                    let reply = reply(&buf[..question_end], rcode, answer);
                    let _ = socket.send_to(&reply, from);
                }
            }
        });
        Ok(Self {
            stop,
            thread: Some(thread),
            etc,
            queries,
        })
    }

    /// Every name asked so far, in order.
    pub fn queries(&self) -> Vec<String> {
        self.queries.lock().unwrap().clone()
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_dir_all(&self.etc);
    }
}

/// A query's name (lowercase, dotted), type, and where its question ends.
fn question(query: &[u8]) -> Option<(String, u16, usize)> {
    if query.len() < 12 || u16::from_be_bytes([query[4], query[5]]) != 1 {
        return None;
    }
    let mut labels = Vec::new();
    let mut at = 12;
    loop {
        let len = usize::from(*query.get(at)?);
        at += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None;
        }
        labels.push(String::from_utf8_lossy(query.get(at..at + len)?).to_ascii_lowercase());
        at += len;
    }
    let qtype = u16::from_be_bytes([*query.get(at)?, *query.get(at + 1)?]);
    Some((labels.join("."), qtype, at + 4))
}

/// The answer to `query` (its header and question): `rcode`, and one A record if `address`.
fn reply(query: &[u8], rcode: u16, address: Option<Ipv4Addr>) -> Vec<u8> {
    let mut out = query.to_vec();
    // QR, the client's RD, RA; one question, the answers, nothing else.
    let flags = 0x8080 | (u16::from_be_bytes([query[2], query[3]]) & 0x0100) | rcode;
    out[2..4].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&u16::from(address.is_some()).to_be_bytes());
    out[8..12].fill(0);
    if let Some(ip) = address {
        out.extend_from_slice(&[0xc0, 12]); // the name: a pointer to the question's
        out.extend_from_slice(&TYPE_A.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&5u32.to_be_bytes()); // TTL
        out.extend_from_slice(&4u16.to_be_bytes());
        out.extend_from_slice(&ip.octets());
    }
    out
}
