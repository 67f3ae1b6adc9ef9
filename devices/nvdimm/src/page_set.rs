//! `PageSet`: the pages of one device waiting for a writeback.
//!
//! A bitmap sized for the device, allocated once, plus the list of its non-zero words. Taking
//! the set visits only those words, so a flush of k dirty pages costs O(k), not O(device size),
//! however large the device is: the property the dirty ring needs to pay off.

/// A contiguous range of pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub first_page: u64,
    pub pages: u64,
}

/// A set of page numbers below a fixed bound.
#[derive(Clone, Debug)]
pub struct PageSet {
    words: Vec<u64>,
    /// Indices of the non-zero words of `words`, each once, in no order.
    touched: Vec<usize>,
    pages: u64,
    count: u64,
}

impl PageSet {
    /// An empty set of pages `0..pages`.
    pub fn new(pages: u64) -> Self {
        PageSet {
            words: vec![0; pages.div_ceil(64) as usize],
            touched: Vec::new(),
            pages,
            count: 0,
        }
    }

    /// Pages in the set.
    pub fn len(&self) -> u64 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Adds a page; false (and no change) if it is outside the set's bound.
    pub fn insert(&mut self, page: u64) -> bool {
        if page >= self.pages {
            return false;
        }
        self.or_word((page / 64) as usize, 1 << (page % 64));
        true
    }

    /// Adds every page below the bound: O(device size), for when nothing finer is known.
    pub fn insert_all(&mut self) {
        let words = self.words.len();
        for w in 0..words {
            let bits = if w + 1 == words && self.pages % 64 != 0 {
                (1u64 << (self.pages % 64)) - 1
            } else {
                !0
            };
            self.or_word(w, bits);
        }
    }

    /// Adds every page of each run that lies inside the bound.
    pub fn insert_runs(&mut self, runs: &[Run]) {
        for run in runs {
            let end = run.first_page.saturating_add(run.pages).min(self.pages);
            for page in run.first_page..end {
                self.insert(page);
            }
        }
    }

    /// ORs in a bitmap of the same layout (bit `i` of word `w` is page `64 * w + i`), such as
    /// KVM's dirty log; bits past the bound are dropped. Zero words cost a compare each.
    pub fn or_bitmap(&mut self, bitmap: &[u64]) {
        let tail = self.pages % 64;
        let last = self.words.len().checked_sub(1);
        for (w, &bits) in bitmap.iter().enumerate().take(self.words.len()) {
            if bits == 0 {
                continue;
            }
            let bits = if Some(w) == last && tail != 0 {
                bits & ((1u64 << tail) - 1)
            } else {
                bits
            };
            self.or_word(w, bits);
        }
    }

    fn or_word(&mut self, w: usize, bits: u64) {
        let old = self.words[w];
        let new = old | bits;
        if new == old {
            return;
        }
        if old == 0 {
            self.touched.push(w);
        }
        self.words[w] = new;
        self.count += u64::from((new & !old).count_ones());
    }

    /// Whether `page` is in the set.
    pub fn contains(&self, page: u64) -> bool {
        page < self.pages && self.words[(page / 64) as usize] >> (page % 64) & 1 == 1
    }

    /// Pages in the union of this set and `bitmap`, without changing either.
    pub fn union_len(&self, bitmap: &[u64]) -> u64 {
        let mut other = self.clone();
        other.or_bitmap(bitmap);
        other.len()
    }

    /// Empties the set and returns its maximal runs in page order.
    pub fn take_runs(&mut self) -> Vec<Run> {
        self.touched.sort_unstable();
        let mut runs = RunBuilder::default();
        for &w in &self.touched {
            runs.add_word(w as u64, self.words[w]);
            self.words[w] = 0;
        }
        self.touched.clear();
        self.count = 0;
        runs.finish()
    }
}

/// Builds maximal runs from bitmap words fed in increasing word order.
#[derive(Default)]
struct RunBuilder {
    out: Vec<Run>,
    current: Option<Run>,
}

impl RunBuilder {
    fn add_word(&mut self, index: u64, word: u64) {
        let base = index * 64;
        let mut bits = word;
        while bits != 0 {
            let start = bits.trailing_zeros();
            let len = (bits >> start).trailing_ones();
            let first_page = base + u64::from(start);
            match self.current.as_mut() {
                Some(run) if run.first_page + run.pages == first_page => {
                    run.pages += u64::from(len)
                }
                _ => {
                    self.out.extend(self.current.take());
                    self.current = Some(Run {
                        first_page,
                        pages: u64::from(len),
                    });
                }
            }
            let end = start + len;
            bits = if end >= 64 { 0 } else { bits & (!0u64 << end) };
        }
    }

    fn finish(mut self) -> Vec<Run> {
        self.out.extend(self.current.take());
        self.out
    }
}

/// The maximal runs of set bits of a whole bitmap, in page order. Runs continue across word
/// boundaries.
pub fn runs(bitmap: &[u64]) -> Vec<Run> {
    let mut b = RunBuilder::default();
    for (w, &word) in bitmap.iter().enumerate() {
        b.add_word(w as u64, word);
    }
    b.finish()
}

/// Pages in a list of runs.
pub fn run_pages(runs: &[Run]) -> u64 {
    runs.iter().map(|r| r.pages).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(first_page: u64, pages: u64) -> Run {
        Run { first_page, pages }
    }

    /// Page-by-page oracle: a run is extended while the next page is set.
    fn oracle_runs(bitmap: &[u64]) -> Vec<Run> {
        let mut out: Vec<Run> = Vec::new();
        for page in 0..bitmap.len() as u64 * 64 {
            if bitmap[(page / 64) as usize] >> (page % 64) & 1 == 0 {
                continue;
            }
            match out.last_mut() {
                Some(r) if r.first_page + r.pages == page => r.pages += 1,
                _ => out.push(run(page, 1)),
            }
        }
        out
    }

    #[test]
    fn runs_of_simple_bitmaps() {
        assert_eq!(runs(&[]), vec![]);
        assert_eq!(runs(&[0, 0]), vec![]);
        assert_eq!(runs(&[0b1011]), vec![run(0, 2), run(3, 1)]);
        assert_eq!(runs(&[!0, !0]), vec![run(0, 128)]);
        assert_eq!(runs(&[1 << 63, 1]), vec![run(63, 2)]);
        assert_eq!(runs(&[1 << 63, 0, 1]), vec![run(63, 1), run(128, 1)]);
    }

    #[test]
    fn insert_take_and_bounds() {
        let mut s = PageSet::new(130);
        assert!(s.is_empty());
        for p in [129, 5, 64, 63, 6, 5] {
            assert!(s.insert(p));
        }
        assert!(!s.insert(130), "page past the bound");
        assert_eq!(s.len(), 5);
        assert!(s.contains(63) && !s.contains(62) && !s.contains(1000));
        assert_eq!(s.take_runs(), vec![run(5, 2), run(63, 2), run(129, 1)]);
        assert!(s.is_empty());
        assert_eq!(s.take_runs(), vec![]);
        s.insert_runs(&[run(128, 5), run(0, 1)]);
        assert_eq!(s.take_runs(), vec![run(0, 1), run(128, 2)]);
        s.insert(3);
        s.insert_all();
        assert_eq!(s.len(), 130);
        assert_eq!(s.take_runs(), vec![run(0, 130)]);
    }

    #[test]
    fn or_bitmap_drops_bits_past_the_bound() {
        let mut s = PageSet::new(66);
        s.or_bitmap(&[1, !0, !0]);
        assert_eq!(s.len(), 3);
        assert_eq!(s.take_runs(), vec![run(0, 1), run(64, 2)]);
        assert_eq!(PageSet::new(66).union_len(&[0b11, 0]), 2);
    }

    proptest! {
        #[test]
        fn runs_match_the_page_by_page_oracle(
            // Mix dense, sparse and all-ones words so runs cross word boundaries.
            bitmap in proptest::collection::vec(
                prop_oneof![Just(0u64), Just(!0u64), any::<u64>(), (0u32..64).prop_map(|b| 1u64 << b)],
                0..12,
            )
        ) {
            let got = runs(&bitmap);
            prop_assert_eq!(&got, &oracle_runs(&bitmap));
            let ones: u64 = bitmap.iter().map(|w| u64::from(w.count_ones())).sum();
            prop_assert_eq!(run_pages(&got), ones);
        }

        #[test]
        fn a_set_built_in_any_order_takes_the_oracle_runs(
            bitmap in proptest::collection::vec(
                prop_oneof![Just(0u64), Just(!0u64), any::<u64>(), (0u32..64).prop_map(|b| 1u64 << b)],
                1..12,
            ),
            split in any::<u64>(),
        ) {
            let pages = bitmap.len() as u64 * 64;
            let mut set = PageSet::new(pages);
            // Half the pages one by one, in reverse; the rest as a bitmap.
            let mut rest = bitmap.clone();
            for page in (0..pages).rev() {
                let (w, b) = ((page / 64) as usize, page % 64);
                if bitmap[w] >> b & 1 == 1 && split >> (page % 64) & 1 == 1 {
                    set.insert(page);
                    rest[w] &= !(1 << b);
                }
            }
            set.or_bitmap(&rest);
            let ones: u64 = bitmap.iter().map(|w| u64::from(w.count_ones())).sum();
            prop_assert_eq!(set.len(), ones);
            prop_assert_eq!(set.take_runs(), oracle_runs(&bitmap));
            prop_assert!(set.is_empty());
        }
    }
}
