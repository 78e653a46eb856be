//! The global allocator: the C library's `malloc`, also for over-aligned blocks.
//!
//! tokio aligns every task to 128 bytes (two cache lines), and hyper spawns two tasks for each
//! HTTP/2 request: one per server stream and one per client request. Rust's system allocator
//! hands an alignment above 16 bytes to `posix_memalign`, which glibc 2.36 (Debian 12, the
//! proxy image's base) serves on its slow path: it skips the per-thread cache, takes a larger
//! block and frees the cut-off ends, on every spawn. Here an over-aligned block is a `malloc`
//! of its size plus its alignment, aligned within, with the start of the whole block stored
//! just before the aligned one, so spawns take `malloc`'s fast paths.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout};

/// The alignment of every `malloc` block, whatever its size: glibc's `MALLOC_ALIGNMENT`, 16
/// bytes on 64-bit targets (x86-64, aarch64). Taken as 8 elsewhere, as std's allocator does.
const MALLOC_ALIGN: usize = if cfg!(target_pointer_width = "64") {
    16
} else {
    8
};

pub struct Allocator;

// SAFETY: every block comes from `malloc`, `calloc` or `realloc` and goes back to `free` or
// `realloc` whole: an over-aligned block by the start of the `malloc` block it lies in, which
// `dealloc` and `realloc` tell from the layout's alignment alone.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= MALLOC_ALIGN {
            // SAFETY: `malloc` takes any size; a null return is passed on as the failure.
            return unsafe { libc::malloc(layout.size()) }.cast();
        }
        let Some(total) = layout.size().checked_add(layout.align()) else {
            return std::ptr::null_mut();
        };
        // SAFETY: `malloc` takes any size; a null return is passed on as the failure.
        let start = unsafe { libc::malloc(total) }.cast::<u8>();
        if start.is_null() {
            return start;
        }
        // `start` is aligned to MALLOC_ALIGN and `align` is a larger power of two, so the
        // aligned block begins MALLOC_ALIGN to `align` bytes in: room for the start's address
        // before it, and `size` bytes after it within `total`.
        let offset = layout.align() - (start.addr() & (layout.align() - 1));
        // SAFETY: `offset` <= `align`, inside the `total` bytes just taken.
        let block = unsafe { start.add(offset) };
        // SAFETY: the pointer-sized slot before `block` lies past `start` (offset >=
        // MALLOC_ALIGN, at least two pointers) and is aligned, since `block` is aligned to more.
        unsafe { block.cast::<*mut u8>().sub(1).write(start) };
        block
    }

    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        if layout.align() <= MALLOC_ALIGN {
            // SAFETY: `alloc` took this block from `malloc` (or `calloc`, `realloc`) as it is.
            return unsafe { libc::free(block.cast()) };
        }
        // SAFETY: `alloc` wrote the start of the `malloc` block just before this one.
        unsafe { libc::free(block.cast::<*mut u8>().sub(1).read().cast()) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= MALLOC_ALIGN {
            // SAFETY: `calloc` takes any size; a null return is passed on as the failure.
            return unsafe { libc::calloc(1, layout.size()) }.cast();
        }
        // SAFETY: the caller's contract is ours; a non-null block has `size` writable bytes.
        unsafe {
            let block = self.alloc(layout);
            if !block.is_null() {
                block.write_bytes(0, layout.size());
            }
            block
        }
    }

    unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.align() <= MALLOC_ALIGN {
            // SAFETY: the block came from `malloc` as it is; `realloc` keeps the alignment.
            return unsafe { libc::realloc(block.cast(), new_size) }.cast();
        }
        // SAFETY: the caller's contract: `new_size` with this alignment is a valid layout.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: both blocks are live and at least the smaller size long; the old one is
        // released once copied.
        unsafe {
            let new = self.alloc(new_layout);
            if !new.is_null() {
                new.copy_from_nonoverlapping(block, layout.size().min(new_size));
                self.dealloc(block, layout);
            }
            new
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn over_aligned_blocks_are_aligned_hold_their_bytes_and_grow() {
        for align in [32, 64, 128, 256, 4096] {
            for size in [1, 15, 16, 100, 1408, 1664, 70_000] {
                let layout = Layout::from_size_align(size, align).unwrap();
                // SAFETY: non-zero sizes; each block is written within its size and released
                // once with the layout it was taken with.
                unsafe {
                    let block = Allocator.alloc(layout);
                    assert!(!block.is_null());
                    assert_eq!(block.addr() % align, 0, "size {size}, align {align}");
                    block.write_bytes(0xa5, size);
                    let grown = Allocator.realloc(block, layout, size * 3);
                    assert_eq!(grown.addr() % align, 0, "grown: size {size}, align {align}");
                    let kept = std::slice::from_raw_parts(grown, size);
                    assert!(
                        kept.iter().all(|&b| b == 0xa5),
                        "size {size}, align {align}"
                    );
                    Allocator.dealloc(grown, Layout::from_size_align(size * 3, align).unwrap());

                    let zeroed = Allocator.alloc_zeroed(layout);
                    assert_eq!(zeroed.addr() % align, 0);
                    assert!(std::slice::from_raw_parts(zeroed, size)
                        .iter()
                        .all(|&b| b == 0));
                    Allocator.dealloc(zeroed, layout);
                }
            }
        }
    }

    /// tokio's tasks are what the allocator is for: spawn enough to reuse freed blocks.
    #[test]
    fn tokio_tasks_run_on_it() {
        #[repr(align(128))]
        struct Padded([u8; 1500]);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let sum = runtime.block_on(async {
            let mut sum = 0usize;
            for i in 0..1000 {
                let padded = Padded([i as u8; 1500]);
                sum += tokio::spawn(
                    async move { padded.0.iter().map(|&b| b as usize).sum::<usize>() },
                )
                .await
                .unwrap();
            }
            sum
        });
        assert_eq!(sum, (0..1000).map(|i| (i % 256) * 1500).sum::<usize>());
    }
}
