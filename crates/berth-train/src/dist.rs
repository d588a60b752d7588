//! The data-parallel seam of the training loop. The loop calls a [`Collective`] in three
//! places: it shards every global batch by rank ([`Collective::shard`]), all-reduces the
//! accumulated gradients before clipping ([`Collective::all_reduce_sum`]), and lets rank 0
//! alone write config, metrics and checkpoints ([`Collective::is_writer`]). One process is
//! [`SingleProcess`]; an MPI implementation (a cargo feature) and a GPU one plug in here
//! without touching the loop.
use crate::error::Result;

/// Communication among the processes of one run.
pub trait Collective {
    /// This process's rank, 0-based.
    fn rank(&self) -> usize;

    /// Processes in the run.
    fn world_size(&self) -> usize;

    /// Sums `buf` element-wise over all ranks, in place, in a fixed order (the same result
    /// on every rank and on every run of the same world size).
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()>;

    /// Copies rank 0's `buf` into every rank's.
    fn broadcast(&self, buf: &mut Vec<u8>) -> Result<()>;

    /// Whether this rank writes the run's files.
    fn is_writer(&self) -> bool {
        self.rank() == 0
    }

    /// This rank's share of a global batch: a contiguous slice of near-equal size (the
    /// first `len % world` ranks take one more), so every example of the batch is used
    /// exactly once across ranks.
    fn shard<'a>(&self, batch: &'a [usize]) -> &'a [usize] {
        let (n, w, r) = (batch.len(), self.world_size(), self.rank());
        let (base, extra) = (n / w, n % w);
        let start = r * base + r.min(extra);
        &batch[start..start + base + usize::from(r < extra)]
    }
}

/// The one-process run: every reduction is the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_sum(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }

    fn broadcast(&self, _buf: &mut Vec<u8>) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rank of a pretend world, to test the sharding arithmetic.
    struct Rank(usize, usize);

    impl Collective for Rank {
        fn rank(&self) -> usize {
            self.0
        }
        fn world_size(&self) -> usize {
            self.1
        }
        fn all_reduce_sum(&self, _: &mut [f32]) -> Result<()> {
            Ok(())
        }
        fn broadcast(&self, _: &mut Vec<u8>) -> Result<()> {
            Ok(())
        }
    }

    #[test]
    fn shards_cover_each_batch_once_in_order() {
        for world in 1..6 {
            for n in 0..23 {
                let batch: Vec<usize> = (100..100 + n).collect();
                let parts: Vec<&[usize]> =
                    (0..world).map(|r| Rank(r, world).shard(&batch)).collect();
                assert_eq!(parts.concat(), batch, "world {world}, n {n}");
                let sizes: Vec<usize> = parts.iter().map(|p| p.len()).collect();
                assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1);
            }
        }
        assert_eq!(SingleProcess.shard(&[3, 1, 2]), &[3, 1, 2]);
        assert!(SingleProcess.is_writer());
    }
}
