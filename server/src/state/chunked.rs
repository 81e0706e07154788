//! Storage for the id tables that grows a chunk at a time and never moves
//! what it holds.
//!
//! A `Vec` or `VecDeque` grows by doubling: each growth copies everything
//! into a new allocation, a pause on the shard that grows with the table
//! (a line of 8 M ids is 128 MB to copy), and the copy's pages are touched
//! a second time. The remembered ids only grow at the end (and the line
//! only shrinks at the front), so chunks do: a growth allocates one chunk
//! and copies nothing.

use std::collections::VecDeque;

/// Elements per chunk: a chunk of 64-byte slab slots (an id and its entry)
/// is 256 KiB, one of 16-byte places in the eviction line 64 KiB. Pages of
/// a chunk count towards RSS only once they are written.
pub const CHUNK: usize = 1 << CHUNK_BITS;
const CHUNK_BITS: u32 = 12;
/// A [`ChunkedVec`]'s first chunks are smaller, so that a table of a few
/// ids stays small: 16 elements, 16 more, 32, 64, ... up to 2,048 (the
/// first `CHUNK` elements in all), each allocated whole; then chunks of
/// `CHUNK`.
const FIRST_BITS: u32 = 4;
const SMALL_CHUNKS: usize = (CHUNK_BITS - FIRST_BITS + 1) as usize;

/// The chunk that holds element `i`, and where in it.
fn place(i: usize) -> (usize, usize) {
    if i < CHUNK {
        let bits = usize::BITS - i.leading_zeros();
        if bits <= FIRST_BITS {
            (0, i)
        } else {
            ((bits - FIRST_BITS) as usize, i - (1 << (bits - 1)))
        }
    } else {
        let past = i - CHUNK;
        (SMALL_CHUNKS + past / CHUNK, past % CHUNK)
    }
}

/// Elements chunk `c` holds.
fn capacity_of(c: usize) -> usize {
    match c {
        0 => 1 << FIRST_BITS,
        c if c < SMALL_CHUNKS => 1 << (FIRST_BITS + c as u32 - 1),
        _ => CHUNK,
    }
}

/// A vector in chunks that are allocated whole and never move: push at
/// the end, read and write by position.
pub struct ChunkedVec<T> {
    /// Every chunk but the last is full.
    chunks: Vec<Vec<T>>,
    len: usize,
}

impl<T> Default for ChunkedVec<T> {
    fn default() -> Self {
        ChunkedVec { chunks: Vec::new(), len: 0 }
    }
}

impl<T> ChunkedVec<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn push(&mut self, v: T) {
        let (c, _) = place(self.len);
        if c == self.chunks.len() {
            self.chunks.push(Vec::with_capacity(capacity_of(c)));
        }
        self.chunks[c].push(v);
        self.len += 1;
    }

    /// The element at `i`; panics past the end, like a slice.
    pub fn at(&self, i: usize) -> &T {
        let (c, at) = place(i);
        &self.chunks[c][at]
    }

    pub fn at_mut(&mut self, i: usize) -> &mut T {
        let (c, at) = place(i);
        &mut self.chunks[c][at]
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> + '_ {
        self.chunks.iter().flatten()
    }

    /// The elements from position `i` on (none if `i` is past the end),
    /// found once and then walked chunk by chunk.
    pub fn iter_from(&self, i: usize) -> impl Iterator<Item = &T> + '_ {
        let (c, at) = place(i.min(self.len));
        self.chunks
            .iter()
            .skip(c)
            .enumerate()
            .flat_map(move |(k, chunk)| chunk[if k == 0 { at } else { 0 }..].iter())
    }

    /// Every element in order, leaving the vector empty.
    pub fn take_all(&mut self) -> impl Iterator<Item = T> {
        self.len = 0;
        std::mem::take(&mut self.chunks).into_iter().flatten()
    }
}

/// A first-in first-out line in chunks of [`CHUNK`]: push at the back, pop
/// at the front; a chunk is freed once everything in it has been popped.
pub struct ChunkedQueue<T> {
    chunks: VecDeque<Vec<T>>,
    /// Elements of the front chunk already popped.
    head: usize,
}

impl<T> Default for ChunkedQueue<T> {
    fn default() -> Self {
        ChunkedQueue { chunks: VecDeque::new(), head: 0 }
    }
}

impl<T: Copy> ChunkedQueue<T> {
    pub fn len(&self) -> usize {
        self.chunks.iter().map(Vec::len).sum::<usize>() - self.head
    }

    pub fn is_empty(&self) -> bool {
        self.front().is_none()
    }

    pub fn push_back(&mut self, v: T) {
        match self.chunks.back_mut() {
            // The first chunk grows as a `Vec` does (a short line stays
            // small; there is one line per store); the next ones are
            // allocated whole.
            Some(last) if last.len() < CHUNK => last.push(v),
            Some(_) => {
                let mut chunk = Vec::with_capacity(CHUNK);
                chunk.push(v);
                self.chunks.push_back(chunk);
            }
            None => self.chunks.push_back(vec![v]),
        }
    }

    pub fn front(&self) -> Option<&T> {
        self.chunks.front().and_then(|c| c.get(self.head))
    }

    /// The newest value, if any.
    pub fn back(&self) -> Option<&T> {
        self.chunks.back().and_then(|c| c.last()).filter(|_| !self.is_empty())
    }

    pub fn pop_front(&mut self) -> Option<T> {
        let first = self.chunks.front()?;
        let v = *first.get(self.head)?;
        self.head += 1;
        // A full chunk read to its end is done with; the last one, still
        // being filled, stays.
        if self.head == CHUNK {
            self.chunks.pop_front();
            self.head = 0;
        }
        Some(v)
    }
}

impl<T: Copy> FromIterator<T> for ChunkedQueue<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        let mut q = ChunkedQueue::default();
        for v in iter {
            q.push_back(v);
        }
        q
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    #[test]
    fn chunks_hold_consecutive_elements_and_fill_before_the_next_begins() {
        let mut expect = (0, 0);
        for i in 0..(3 * CHUNK) {
            assert_eq!(place(i), expect, "element {i}");
            expect.1 += 1;
            if expect.1 == capacity_of(expect.0) {
                expect = (expect.0 + 1, 0);
            }
        }
        assert_eq!((0..SMALL_CHUNKS).map(capacity_of).sum::<usize>(), CHUNK);
    }

    #[test]
    fn a_chunked_vec_reads_and_writes_like_a_vec_across_chunk_boundaries() {
        let mut c: ChunkedVec<u64> = ChunkedVec::default();
        let mut v: Vec<u64> = Vec::new();
        assert!(c.is_empty());
        for i in 0..(3 * CHUNK as u64 + 17) {
            c.push(i * 7);
            v.push(i * 7);
            if i % 1000 == 999 {
                let at = (i as usize * 31) % v.len();
                *c.at_mut(at) += 1;
                v[at] += 1;
            }
        }
        assert_eq!(c.len(), v.len());
        for (i, want) in v.iter().enumerate() {
            assert_eq!(c.at(i), want, "element {i}");
        }
        assert!(c.iter().eq(v.iter()));
        for from in [
            0,
            1,
            15,
            16,
            17,
            2047,
            2048,
            CHUNK - 1,
            CHUNK,
            CHUNK + 1,
            2 * CHUNK + 5,
            v.len() - 1,
            v.len(),
            v.len() + 9,
        ] {
            assert!(c.iter_from(from).eq(v.iter().skip(from)), "from {from}");
        }
        assert!(c.take_all().eq(v.into_iter()));
        assert!(c.is_empty());
    }

    #[test]
    fn a_chunked_queue_pops_what_was_pushed_in_order_and_frees_chunks_it_has_read() {
        let mut q: ChunkedQueue<u32> = ChunkedQueue::default();
        let mut model: VecDeque<u32> = VecDeque::new();
        let mut x = 0x2545_F491u32;
        for n in 0..(10 * CHUNK as u32) {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            // Pushes outnumber pops two to one, with runs that empty the line.
            if !x.is_multiple_of(3) || n % 5000 < 50 {
                q.push_back(n);
                model.push_back(n);
            } else {
                assert_eq!(q.pop_front(), model.pop_front());
            }
            if n % 5000 < 50 {
                while let Some(v) = model.pop_front() {
                    assert_eq!(q.pop_front(), Some(v));
                }
                assert_eq!(q.pop_front(), None);
                assert!(q.is_empty());
            }
            assert_eq!(q.front(), model.front());
            assert_eq!(q.len(), model.len());
        }
        // Only the chunks holding what is left are kept.
        assert!(
            q.chunks.len() <= model.len().div_ceil(CHUNK) + 1,
            "{} chunks for {}",
            q.chunks.len(),
            model.len()
        );
        let rebuilt: ChunkedQueue<u32> = model.iter().copied().collect();
        assert_eq!(rebuilt.len(), model.len());
        assert_eq!(rebuilt.front(), model.front());
    }
}
