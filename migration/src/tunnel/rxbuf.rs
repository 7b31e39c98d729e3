//! Channels' receive buffers: each channel's unread bytes are a queue of fixed-size chunks
//! taken from one pool per endpoint, and a chunk its reader emptied goes back to the top
//! of the pool (LIFO), so the next payload that arrives, on whichever channel, lands in
//! the memory that was read last and is still in cache.
//!
//! Why: a ring buffer per channel (what this replaced) walks its reader and writer over
//! the channel's whole capacity even when the reader keeps up, so 64 busy channels of
//! 256 KiB windows touch 16 MiB per round of the ring, far beyond the L2 cache, and every
//! payload copy (decrypted record into the channel, channel into the engine's buffer)
//! misses. With the pool, what a tunnel touches is what is actually buffered, rounded up
//! to chunks, whatever the number of channels.
//!
//! Bounds: a channel holds at most its buffered bytes plus two partly used chunks (the
//! front one partly read, the tail one partly filled: a payload always fills the tail
//! chunk before it takes another, so a peer sending one-byte frames does not make a chunk
//! per byte); the pool keeps at most [`POOL_MAX_FREE_CHUNKS`] free chunks and gives the
//! rest back to the allocator.
//!
//! What this module does not do: flow control (the endpoint admits at most the window
//! into a queue) or message boundaries (the endpoint keeps seqpacket ends as offsets).

use std::collections::VecDeque;

/// Bytes per chunk: one TLS record's plaintext (16 KiB), so a record's DATA payload
/// usually spans at most two chunks, and a reader that keeps up holds few.
pub const CHUNK_BYTES: usize = 16 << 10;
/// Free chunks the pool keeps (2 MiB, twice a core's L2 cache here); beyond that, an
/// emptied chunk is freed. Only the top of the pool is warm, so a longer free list would
/// only keep memory.
pub const POOL_MAX_FREE_CHUNKS: usize = 128;

type Chunk = Box<[u8]>;

/// Free chunks of one endpoint; the most recently returned is handed out first.
#[derive(Debug, Default)]
pub struct RxPool {
    free: Vec<Chunk>,
    /// Chunks allocated because the pool was empty (a measure of its reuse).
    allocated: u64,
}

impl RxPool {
    fn take(&mut self) -> Chunk {
        self.free.pop().unwrap_or_else(|| {
            self.allocated += 1;
            vec![0u8; CHUNK_BYTES].into_boxed_slice()
        })
    }

    fn give(&mut self, c: Chunk) {
        if self.free.len() < POOL_MAX_FREE_CHUNKS {
            self.free.push(c);
        }
    }

    /// Free chunks held.
    pub fn free_chunks(&self) -> usize {
        self.free.len()
    }

    /// Chunks allocated so far (the pool had none free).
    pub fn allocated_chunks(&self) -> u64 {
        self.allocated
    }
}

/// One channel's unread bytes, in order.
#[derive(Debug, Default)]
pub struct RxQueue {
    chunks: VecDeque<Chunk>,
    /// Read position in the front chunk.
    head: usize,
    /// Fill position in the back chunk.
    tail: usize,
    len: usize,
}

impl RxQueue {
    /// Bytes buffered.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is buffered.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Chunks held (buffered bytes plus at most two partly used chunks' worth).
    pub fn chunks(&self) -> usize {
        self.chunks.len()
    }

    /// Appends `bytes`, filling the last chunk first.
    pub fn push(&mut self, pool: &mut RxPool, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.chunks.is_empty() || self.tail == CHUNK_BYTES {
                self.chunks.push_back(pool.take());
                self.tail = 0;
                if self.chunks.len() == 1 {
                    self.head = 0;
                }
            }
            let back = self.chunks.back_mut().expect("just ensured");
            let n = bytes.len().min(CHUNK_BYTES - self.tail);
            back[self.tail..self.tail + n].copy_from_slice(&bytes[..n]);
            self.tail += n;
            self.len += n;
            bytes = &bytes[n..];
        }
    }

    /// The bytes from the front on, as the slices they lie in (at most `max` bytes).
    fn front(&self, max: usize) -> impl Iterator<Item = &[u8]> {
        let last = self.chunks.len().saturating_sub(1);
        let mut left = max.min(self.len);
        self.chunks.iter().enumerate().map_while(move |(i, c)| {
            if left == 0 {
                return None;
            }
            let from = if i == 0 { self.head } else { 0 };
            let to = if i == last { self.tail } else { CHUNK_BYTES };
            let n = (to - from).min(left);
            left -= n;
            Some(&c[from..from + n])
        })
    }

    /// Copies the first `buf.len()` bytes (or all there are) into `buf` without taking
    /// them; returns how many.
    pub fn peek(&self, buf: &mut [u8]) -> usize {
        let mut n = 0;
        for s in self.front(buf.len()) {
            buf[n..n + s.len()].copy_from_slice(s);
            n += s.len();
        }
        n
    }

    /// Drops the first `n` bytes (at most all of them); emptied chunks go back to the
    /// pool, the most recently read on top.
    pub fn discard(&mut self, pool: &mut RxPool, n: usize) {
        let mut n = n.min(self.len);
        self.len -= n;
        while n > 0 {
            let end = if self.chunks.len() == 1 {
                self.tail
            } else {
                CHUNK_BYTES
            };
            let here = (end - self.head).min(n);
            self.head += here;
            n -= here;
            // An emptied chunk goes back, the tail one too (an idle channel holds none).
            if self.head == end {
                self.pop_front(pool);
            }
        }
    }

    fn pop_front(&mut self, pool: &mut RxPool) {
        if let Some(c) = self.chunks.pop_front() {
            pool.give(c);
        }
        self.head = 0;
        if self.chunks.is_empty() {
            self.tail = 0;
        }
    }

    /// Takes up to `buf.len()` bytes into `buf`; returns how many.
    pub fn read(&mut self, pool: &mut RxPool, buf: &mut [u8]) -> usize {
        let n = self.peek(buf);
        self.discard(pool, n);
        n
    }

    /// Drops everything.
    pub fn clear(&mut self, pool: &mut RxPool) {
        self.discard(pool, self.len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(at: usize) -> u8 {
        (at.wrapping_mul(131) >> 3) as u8
    }

    #[test]
    fn bytes_come_out_in_order_across_chunks() {
        let mut pool = RxPool::default();
        let mut q = RxQueue::default();
        let (mut written, mut read) = (0usize, 0usize);
        // Writes and reads of odd sizes, so boundaries fall everywhere in the chunks.
        for (i, w) in [1usize, 7_000, 16_384, 40_000, 3, 16_383, 70_000]
            .into_iter()
            .enumerate()
        {
            let bytes: Vec<u8> = (written..written + w).map(pattern).collect();
            q.push(&mut pool, &bytes);
            written += w;
            assert_eq!(q.len(), written - read);
            let mut buf = vec![0u8; [5_000, 20_000, 1, 65_536][i % 4]];
            let n = q.read(&mut pool, &mut buf);
            assert_eq!(n, buf.len().min(written - read));
            for (k, b) in buf[..n].iter().enumerate() {
                assert_eq!(*b, pattern(read + k), "byte {}", read + k);
            }
            read += n;
            assert!(q.chunks() <= (written - read).div_ceil(CHUNK_BYTES) + 1);
        }
        let mut rest = vec![0u8; written - read];
        assert_eq!(q.read(&mut pool, &mut rest), written - read);
        assert!(rest
            .iter()
            .enumerate()
            .all(|(k, b)| *b == pattern(read + k)));
        assert!(q.is_empty());
        assert_eq!(q.chunks(), 0, "an emptied queue holds no chunk");
    }

    #[test]
    fn a_reader_that_keeps_up_reuses_the_chunk_it_read_last() {
        let mut pool = RxPool::default();
        let mut queues: Vec<RxQueue> = (0..64).map(|_| RxQueue::default()).collect();
        let payload = vec![0x5au8; 4_000];
        let mut buf = vec![0u8; 64 << 10];
        // 64 channels in turn, each read right after its payload arrived: one chunk is
        // enough for all of them.
        for round in 0..100 {
            for q in &mut queues {
                q.push(&mut pool, &payload);
                assert_eq!(q.read(&mut pool, &mut buf), payload.len(), "round {round}");
            }
        }
        assert_eq!(pool.allocated_chunks(), 1);
        assert_eq!(pool.free_chunks(), 1);
    }

    #[test]
    fn the_last_emptied_chunk_is_handed_out_first() {
        let mut pool = RxPool::default();
        let (mut a, mut b) = (RxQueue::default(), RxQueue::default());
        a.push(&mut pool, &[1u8; CHUNK_BYTES]);
        b.push(&mut pool, &[2u8; CHUNK_BYTES]);
        let b_chunk = b.chunks[0].as_ptr();
        a.clear(&mut pool);
        b.clear(&mut pool);
        let mut c = RxQueue::default();
        c.push(&mut pool, &[3u8]);
        assert_eq!(
            c.chunks[0].as_ptr(),
            b_chunk,
            "LIFO: b's chunk was freed last"
        );
    }

    #[test]
    fn one_byte_payloads_share_a_chunk_and_the_pool_is_bounded() {
        let mut pool = RxPool::default();
        let mut q = RxQueue::default();
        for _ in 0..10_000 {
            q.push(&mut pool, &[9]);
        }
        assert_eq!(q.chunks(), 1);
        // Many queues emptied at once: the pool keeps its bound, not all their chunks.
        let mut many: Vec<RxQueue> = (0..POOL_MAX_FREE_CHUNKS + 50)
            .map(|_| {
                let mut q = RxQueue::default();
                q.push(&mut pool, &[1; 10]);
                q
            })
            .collect();
        for q in &mut many {
            q.clear(&mut pool);
        }
        assert_eq!(pool.free_chunks(), POOL_MAX_FREE_CHUNKS);
    }

    #[test]
    fn discard_and_peek_keep_the_rest_in_place() {
        let mut pool = RxPool::default();
        let mut q = RxQueue::default();
        let bytes: Vec<u8> = (0..3 * CHUNK_BYTES + 5).map(pattern).collect();
        q.push(&mut pool, &bytes);
        let mut head = [0u8; 10];
        assert_eq!(q.peek(&mut head), 10);
        assert_eq!(&head[..], &bytes[..10]);
        q.discard(&mut pool, CHUNK_BYTES + 3);
        assert_eq!(q.len(), bytes.len() - CHUNK_BYTES - 3);
        let mut rest = vec![0u8; q.len()];
        assert_eq!(q.peek(&mut rest), rest.len());
        assert_eq!(&rest[..], &bytes[CHUNK_BYTES + 3..]);
        q.discard(&mut pool, usize::MAX);
        assert!(q.is_empty() && q.chunks() == 0);
    }
}
