//! A growable bitset over node slots: the scheduler's index (one per tag value, one for
//! the schedulable nodes). Words past a set's length are zero.

/// Bits over `0..len` (grows on `set`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Bitset {
    words: Vec<u64>,
}

impl Bitset {
    /// Every bit in `0..n` set.
    pub fn full(n: usize) -> Bitset {
        let mut words = vec![u64::MAX; n / 64];
        if !n.is_multiple_of(64) {
            words.push((1u64 << (n % 64)) - 1);
        }
        Bitset { words }
    }

    /// Set bit `i`.
    pub fn set(&mut self, i: usize) {
        let w = i / 64;
        if w >= self.words.len() {
            self.words.resize(w + 1, 0);
        }
        self.words[w] |= 1 << (i % 64);
    }

    /// Clear bit `i`.
    pub fn clear(&mut self, i: usize) {
        if let Some(w) = self.words.get_mut(i / 64) {
            *w &= !(1 << (i % 64));
        }
    }

    /// Bit `i`.
    pub fn get(&self, i: usize) -> bool {
        self.words
            .get(i / 64)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    /// Bits set.
    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Whether no bit is set.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|w| *w == 0)
    }

    /// Whether a bit is set in both.
    pub fn intersects(&self, other: &Bitset) -> bool {
        self.words.iter().zip(&other.words).any(|(a, b)| a & b != 0)
    }

    /// `self &= other`.
    pub fn and(&mut self, other: &Bitset) {
        for (i, w) in self.words.iter_mut().enumerate() {
            *w &= other.words.get(i).copied().unwrap_or(0);
        }
    }

    /// `self &= !other`.
    pub fn and_not(&mut self, other: &Bitset) {
        for (w, o) in self.words.iter_mut().zip(&other.words) {
            *w &= !o;
        }
    }

    /// `self |= other`.
    pub fn or(&mut self, other: &Bitset) {
        if other.words.len() > self.words.len() {
            self.words.resize(other.words.len(), 0);
        }
        for (w, o) in self.words.iter_mut().zip(&other.words) {
            *w |= o;
        }
    }

    /// The set bits, starting at the word `start` (modulo the length) and wrapping
    /// around: a random start gives a random sample without a shuffle.
    pub fn iter_from(&self, start: usize) -> impl Iterator<Item = usize> + '_ {
        let n = self.words.len();
        let start = if n == 0 { 0 } else { start % n };
        (0..n).flat_map(move |k| {
            let wi = (start + k) % n;
            let mut w = self.words[wi];
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = w.trailing_zeros() as usize;
                w &= w - 1;
                Some(wi * 64 + b)
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops() {
        let mut a = Bitset::default();
        for i in [0, 3, 64, 130] {
            a.set(i);
        }
        assert_eq!(a.count(), 4);
        assert!(a.get(64) && !a.get(65));
        let mut b = Bitset::full(100);
        b.and(&a);
        assert_eq!(b.iter_from(0).collect::<Vec<_>>(), vec![0, 3, 64]);
        assert_eq!(a.iter_from(1).collect::<Vec<_>>(), vec![64, 130, 0, 3]);
        a.and_not(&b);
        assert_eq!(a.iter_from(0).collect::<Vec<_>>(), vec![130]);
        a.or(&b);
        a.clear(3);
        assert_eq!(a.iter_from(0).collect::<Vec<_>>(), vec![0, 64, 130]);
        assert!(Bitset::full(0).is_empty());
        assert!(a.intersects(&b) && !Bitset::full(0).intersects(&b));
        assert_eq!(Bitset::full(64).count(), 64);
    }
}
