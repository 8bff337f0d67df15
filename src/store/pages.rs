//! Zeroed memory for the membership filters, asked to be backed by huge
//! pages where the system offers them.
//!
//! A filter is read at one random place per lookup, so with 4 KiB pages
//! nearly every lookup also misses the TLB (a 10 MB filter spans 2,560
//! pages), and under virtualisation a TLB miss walks two sets of page
//! tables. The bytes live in an anonymous map advised `MADV_HUGEPAGE`
//! (Linux, transparent huge pages in `madvise` or `always` mode): 2 MiB
//! pages, five TLB entries for the same filter. Where the advice is not
//! taken (other systems, THP off) the map is ordinary memory, and where
//! no map can be made the bytes live on the heap: lookups answer the same
//! either way.

use std::ops::{Deref, DerefMut};

/// A huge page (x86-64, most arm64 kernels).
const HUGE: usize = 2 << 20;

/// Zeroed bytes (see the [module documentation](self)).
pub enum Pages {
    /// An anonymous map (advised for huge pages on Linux), and where in it
    /// the bytes start: at a huge-page boundary, so that every whole 2 MiB
    /// of them can be one huge page (the map is a little longer; its
    /// untouched ends take no memory).
    Mapped {
        /// The map.
        map: memmap2::MmapMut,
        /// The bytes' offset in it.
        start: usize,
        /// How many bytes.
        len: usize,
    },
    /// The heap, where no map could be made.
    Heap(Box<[u8]>),
}

impl std::fmt::Debug for Pages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            Pages::Mapped { .. } => "mapped",
            Pages::Heap(_) => "heap",
        };
        write!(f, "Pages({kind}, {} bytes)", self.len())
    }
}

impl Pages {
    /// `len` zeroed bytes.
    pub fn zeroed(len: usize) -> Self {
        if len == 0 {
            return Pages::Heap(Box::default());
        }
        let slack = if len >= HUGE { HUGE } else { 0 };
        match memmap2::MmapOptions::new().len(len + slack).map_anon() {
            Ok(map) => {
                #[cfg(target_os = "linux")]
                {
                    // Advice only: refused (THP off, an old kernel) the
                    // map still works with ordinary pages.
                    let _ = map.advise(memmap2::Advice::HugePage);
                }
                let address = map.as_ptr() as usize;
                let start = if slack == 0 {
                    0
                } else {
                    address.next_multiple_of(HUGE) - address
                };
                Pages::Mapped { map, start, len }
            }
            Err(_) => Pages::Heap(vec![0; len].into_boxed_slice()),
        }
    }

    /// `bytes` copied into new pages.
    pub fn copy_of(bytes: &[u8]) -> Self {
        let mut pages = Self::zeroed(bytes.len());
        pages.copy_from_slice(bytes);
        pages
    }
}

impl Deref for Pages {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Pages::Mapped { map, start, len } => &map[*start..*start + *len],
            Pages::Heap(bytes) => bytes,
        }
    }
}

impl DerefMut for Pages {
    fn deref_mut(&mut self) -> &mut [u8] {
        match self {
            Pages::Mapped { map, start, len } => &mut map[*start..*start + *len],
            Pages::Heap(bytes) => bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_writable_and_copied() {
        let mut pages = Pages::zeroed(3 << 20);
        assert_eq!(pages.len(), 3 << 20);
        if matches!(pages, Pages::Mapped { .. }) {
            assert_eq!(pages.as_ptr() as usize % HUGE, 0, "starts on a huge page");
        }
        assert!(pages.iter().all(|&b| b == 0));
        pages[(2 << 20) + 5] = 7;
        let copy = Pages::copy_of(&pages);
        assert_eq!(copy[(2 << 20) + 5], 7);
        assert_eq!(copy.len(), pages.len());
        assert!(Pages::zeroed(0).is_empty());
    }
}
