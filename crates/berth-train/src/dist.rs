//! The data-parallel seam of the training loop. The loop calls a [`Collective`] to shard
//! every global batch by rank ([`Collective::shard`]), weight each rank's loss by its share
//! of the batch's loss units ([`Collective::all_reduce_sum_f64`]), all-reduce the
//! accumulated gradients before clipping ([`Collective::all_reduce_sum`]) and agree on which
//! parameters any rank's gradient reached, and to let rank 0 alone evaluate and write
//! config, metrics and checkpoints ([`Collective::is_writer`]), broadcasting its
//! early-stopping decision. Where the implementation allows a second thread to sum
//! ([`Collective::background`]), the last micro-batch's gradients are summed layer by layer
//! while its backward goes on ([`crate::optim::AdamW::backward_summed`]). An objective whose
//! loss needs every rank's values (in-batch negatives) gathers them through the collective
//! it is given. Reading is split by [`Share`]. One process is [`SingleProcess`]; [`world`]
//! picks MPI's world (cargo feature `mpi`) when an MPI launcher started the process.
use crate::error::Result;

/// Communication among the processes of one run (shared by the threads of a rank's
/// data preparation, hence `Sync`; calls are made from one thread at a time).
pub trait Collective: Sync {
    /// This process's rank, 0-based.
    fn rank(&self) -> usize;

    /// Processes in the run.
    fn world_size(&self) -> usize;

    /// Sums `buf` element-wise over all ranks, in place, in a fixed order (the same result
    /// on every rank and on every run of the same world size).
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()>;

    /// [`Self::all_reduce_sum`] for a few f64 counters (loss sums, example counts).
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        if self.world_size() == 1 {
            return Ok(());
        }
        let bytes: Vec<u8> = buf.iter().flat_map(|x| x.to_le_bytes()).collect();
        let all = self.gather_all(&bytes)?;
        for (i, v) in buf.iter_mut().enumerate() {
            *v = all
                .iter()
                .map(|b| f64::from_le_bytes(b[8 * i..8 * i + 8].try_into().expect("8 bytes")))
                .sum();
        }
        Ok(())
    }

    /// Every rank's `mine`, in rank order, on every rank.
    fn gather_all(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>>;

    /// Copies rank 0's `buf` into every rank's.
    fn broadcast(&self, buf: &mut Vec<u8>) -> Result<()>;

    /// The gradient sum as a second thread may call it while this one goes on computing
    /// (the all-reduce overlapped with the backward pass), when the implementation allows
    /// it; `None`: the loop sums after the backward.
    fn background(&self) -> Option<&dyn BackgroundSum> {
        None
    }

    /// Ends every rank of the run with exit status `code` (a rank that failed: the others
    /// may be waiting for it in a collective). One process: returns, the caller exits.
    fn abort(&self, _code: i32) {}

    /// Whether this rank writes the run's files.
    fn is_writer(&self) -> bool {
        self.rank() == 0
    }

    /// This rank's share of a global batch: a contiguous slice of near-equal size (the
    /// first `len % world` ranks take one more), so every example of the batch is used
    /// exactly once across ranks.
    fn shard<'a>(&self, batch: &'a [usize]) -> &'a [usize] {
        &batch[self.shard_range(batch.len())]
    }

    /// The positions [`Self::shard`] takes of a batch of `n`.
    fn shard_range(&self, n: usize) -> std::ops::Range<usize> {
        let (w, r) = (self.world_size(), self.rank());
        let (base, extra) = (n / w, n % w);
        let start = r * base + r.min(extra);
        start..start + base + usize::from(r < extra)
    }
}

/// A process's part of the run's reading: rank `rank` of `world`. Of a prepared corpus,
/// a rank checks (checksum, token ids) only the training shards `k` with
/// `k % world == rank`, and rank 0 alone reads the held-out shards; after that each rank
/// reads from the memory maps only the sequences of its shares of the batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    /// This process's rank.
    pub rank: usize,
    /// Processes in the run.
    pub world: usize,
}

impl Default for Share {
    /// The one-process run: everything is its part.
    fn default() -> Self {
        Share { rank: 0, world: 1 }
    }
}

impl Share {
    /// This process's part of `collective`.
    pub fn of(collective: &dyn Collective) -> Self {
        Share {
            rank: collective.rank(),
            world: collective.world_size(),
        }
    }

    /// Whether item `k` of a list dealt round-robin over the ranks is this rank's.
    pub fn takes(&self, k: usize) -> bool {
        k % self.world.max(1) == self.rank
    }

    /// Whether this rank evaluates (reads the held-out data).
    pub fn evaluates(&self) -> bool {
        self.rank == 0
    }
}

/// [`Collective::all_reduce_sum`] from a background thread. The caller makes no other
/// collective call until that thread is done (MPI's `MPI_THREAD_SERIALIZED`).
pub trait BackgroundSum: Sync {
    /// Sums `buf` over all ranks, in place; the same bits as [`Collective::all_reduce_sum`].
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()>;
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

    fn gather_all(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(vec![mine.to_vec()])
    }

    fn broadcast(&self, _buf: &mut Vec<u8>) -> Result<()> {
        Ok(())
    }
}

/// Environment variables MPI launchers set in every process they start (Open MPI's
/// mpirun, MPICH / Intel MPI's Hydra and Slurm's PMI, PMIx).
const LAUNCHER_SIZE_VARS: [&str; 3] = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"];

/// The size of the world a launcher started this process in, if one did.
fn launched_size() -> Option<usize> {
    LAUNCHER_SIZE_VARS
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
}

/// The processes of this run: MPI's world when an MPI launcher (`mpirun`, `srun`) started
/// this process and berth has the `mpi` feature, else this process alone. Launched as one
/// of several ranks by a berth without MPI is an error, not N copies of the same run.
pub fn world() -> Result<Box<dyn Collective>> {
    match launched_size() {
        #[cfg(feature = "mpi")]
        Some(_) => Ok(Box::new(mpi_world::MpiWorld::init()?)),
        #[cfg(not(feature = "mpi"))]
        Some(n) if n > 1 => Err(crate::TrainError::Config(format!(
            "launched as one of {n} MPI ranks, but this berth was built without MPI \
             (cargo build --release -p berth-cli --features mpi)"
        ))),
        _ => Ok(Box::new(SingleProcess)),
    }
}

/// The MPI world (rsmpi over the system's MPI library).
#[cfg(feature = "mpi")]
pub mod mpi_world {
    use mpi::traits::*;

    use crate::dist::Collective;
    use crate::error::{Result, TrainError};

    /// Elements per bucket of [`MpiWorld::all_reduce_sum`]'s ring: the fastest size measured
    /// on 2 and 3 ranks (`examples/allreduce.rs` times 64 K to 16 M), few enough messages
    /// per step, parts of a few hundred KB.
    pub const BUCKET: usize = 1 << 20;

    /// MPI's world communicator; MPI is finalized when it drops (end of the process).
    pub struct MpiWorld {
        world: mpi::topology::SimpleCommunicator,
        /// Whether the gradient sum may run on a second thread: MPI granted at least
        /// `MPI_THREAD_SERIALIZED` and `BERTH_MPI_OVERLAP` is not `0`.
        overlap: bool,
        _universe: mpi::environment::Universe,
    }

    // SAFETY: the communicator is a handle MPI lets any thread use once it granted
    // MPI_THREAD_SERIALIZED (checked in `init`; without it `background` is `None` and only
    // the main thread calls MPI). Calls never run concurrently: the training loop makes
    // collective calls from the main thread only while no background sum is running, and
    // joins the background thread before its next one.
    unsafe impl Sync for MpiWorld {}

    impl MpiWorld {
        /// Initializes MPI (once per process), asking for `MPI_THREAD_SERIALIZED` so the
        /// gradient sum can overlap the backward pass.
        pub fn init() -> Result<Self> {
            let (universe, granted) = mpi::initialize_with_threading(mpi::Threading::Serialized)
                .ok_or_else(|| {
                    TrainError::Config("MPI was already initialized in this process".into())
                })?;
            let serialized = matches!(
                granted,
                mpi::Threading::Serialized | mpi::Threading::Multiple
            );
            let wanted = std::env::var("BERTH_MPI_OVERLAP").map_or(true, |v| v != "0");
            Ok(MpiWorld {
                world: universe.world(),
                overlap: serialized && wanted,
                _universe: universe,
            })
        }
    }

    impl crate::dist::BackgroundSum for MpiWorld {
        /// The ring, waiting patiently (the backward needs the core).
        fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
            self.ring(buf, BUCKET, true)
        }
    }

    impl MpiWorld {
        /// The sum as an all-gather per bucket of `bucket` elements, then every rank adds
        /// the ranks' copies in rank order. Each rank receives N − 1 times the buffer (the
        /// ring, [`Self::ring_all_reduce_sum_in`], 2 (N − 1) / N times): kept for buckets
        /// smaller than the world and for comparison.
        pub fn all_reduce_sum_in(&self, buf: &mut [f32], bucket: usize) -> Result<()> {
            let n = self.world_size();
            if n == 1 {
                return Ok(());
            }
            let mut all = Vec::new();
            for chunk in buf.chunks_mut(bucket.max(1)) {
                let len = chunk.len();
                all.resize(len * n, 0f32);
                self.world.all_gather_into(&chunk[..], &mut all[..]);
                for (i, v) in chunk.iter_mut().enumerate() {
                    let mut sum = 0f32;
                    for r in 0..n {
                        sum += all[r * len + i];
                    }
                    *v = sum;
                }
            }
            Ok(())
        }

        /// [`Collective::all_reduce_sum`] as a ring, `bucket` elements at a time: each bucket
        /// is cut into one part per rank; in N − 1 steps every rank passes a part to its right
        /// neighbour and adds the part it receives from its left (reduce-scatter), so part `c`
        /// is summed once, starting at rank `c`, in ring order; N − 1 more steps pass the
        /// summed parts around (all-gather). Each rank sends and receives 2 (N − 1) / N of
        /// the buffer (the all-gather form: N − 1 times it), and every rank ends with the
        /// same bits; the order of the additions is fixed for a world size. Buckets smaller
        /// than the world are summed by [`Self::all_reduce_sum_in`].
        pub fn ring_all_reduce_sum_in(&self, buf: &mut [f32], bucket: usize) -> Result<()> {
            self.ring(buf, bucket, false)
        }

        /// Sends `out` to `right` while receiving `got` from `left`. `patient`: with
        /// non-blocking calls polled every 50 µs, sleeping in between, instead of MPI's
        /// blocking wait (which spins on a core: a summing thread beside the backward
        /// would take that core from the backward).
        fn exchange(
            out: &[f32],
            right: &mpi::topology::Process<'_>,
            got: &mut [f32],
            left: &mpi::topology::Process<'_>,
            patient: bool,
        ) {
            if !patient {
                mpi::point_to_point::send_receive_into(out, right, got, left);
                return;
            }
            mpi::request::scope(|scope| {
                let mut send = Some(right.immediate_send(scope, out));
                let mut recv = Some(left.immediate_receive_into(scope, got));
                loop {
                    send = send.and_then(|r| r.test().err());
                    recv = recv.and_then(|r| r.test().err());
                    if send.is_none() && recv.is_none() {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_micros(50));
                }
            });
        }

        /// The ring of [`Self::ring_all_reduce_sum_in`]; `patient` as in [`Self::exchange`].
        fn ring(&self, buf: &mut [f32], bucket: usize, patient: bool) -> Result<()> {
            let n = self.world_size();
            if n == 1 {
                return Ok(());
            }
            let r = self.rank();
            let right = self.world.process_at_rank(((r + 1) % n) as i32);
            let left = self.world.process_at_rank(((r + n - 1) % n) as i32);
            let mut recv = Vec::new();
            for chunk in buf.chunks_mut(bucket.max(1)) {
                let len = chunk.len();
                if len < n {
                    self.all_reduce_sum_in(chunk, bucket)?;
                    continue;
                }
                let part = |k: usize| k * len / n..(k + 1) * len / n;
                recv.resize(len.div_ceil(n), 0f32);
                for step in 0..n - 1 {
                    let (out, inn) = (part((r + n - step) % n), part((r + 2 * n - step - 1) % n));
                    let got = &mut recv[..inn.len()];
                    Self::exchange(&chunk[out], &right, got, &left, patient);
                    for (x, y) in chunk[inn].iter_mut().zip(got.iter()) {
                        *x += y;
                    }
                }
                for step in 0..n - 1 {
                    let (out, inn) = (part((r + 1 + n - step) % n), part((r + n - step) % n));
                    let got = &mut recv[..inn.len()];
                    Self::exchange(&chunk[out], &right, got, &left, patient);
                    chunk[inn].copy_from_slice(got);
                }
            }
            Ok(())
        }

        /// A barrier (every rank waits for the others).
        pub fn barrier(&self) {
            self.world.barrier();
        }
    }

    impl Collective for MpiWorld {
        fn rank(&self) -> usize {
            self.world.rank() as usize
        }

        fn world_size(&self) -> usize {
            self.world.size() as usize
        }

        /// A ring reduce-scatter + all-gather per bucket ([`Self::ring_all_reduce_sum_in`]):
        /// bit-identical results on all ranks and on every run of a world size (MPI's own
        /// all-reduce may add in an order of its choosing).
        fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
            self.ring_all_reduce_sum_in(buf, BUCKET)
        }

        fn gather_all(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
            let n = self.world_size();
            let len = mine.len() as u64;
            let mut lens = vec![0u64; n];
            self.world.all_gather_into(&len, &mut lens[..]);
            let counts: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
            let displs: Vec<i32> = counts
                .iter()
                .scan(0i32, |acc, &c| {
                    let d = *acc;
                    *acc += c;
                    Some(d)
                })
                .collect();
            let total: usize = lens.iter().map(|&l| l as usize).sum();
            if total > i32::MAX as usize {
                return Err(TrainError::Config(format!(
                    "gathering {total} bytes over MPI: more than one message holds"
                )));
            }
            let mut all = vec![0u8; total];
            {
                let mut part =
                    mpi::datatype::PartitionMut::new(&mut all[..], &counts[..], &displs[..]);
                self.world.all_gather_varcount_into(mine, &mut part);
            }
            Ok(counts
                .iter()
                .zip(&displs)
                .map(|(&c, &d)| all[d as usize..(d + c) as usize].to_vec())
                .collect())
        }

        fn background(&self) -> Option<&dyn crate::dist::BackgroundSum> {
            (self.overlap && self.world_size() > 1).then_some(self as _)
        }

        fn abort(&self, code: i32) {
            if self.world_size() > 1 {
                self.world.abort(code);
            }
        }

        fn broadcast(&self, buf: &mut Vec<u8>) -> Result<()> {
            let root = self.world.process_at_rank(0);
            let mut len = buf.len() as u64;
            root.broadcast_into(&mut len);
            buf.resize(len as usize, 0);
            // An empty buffer (a barrier) has no data pointer MPI accepts.
            if len > 0 {
                root.broadcast_into(&mut buf[..]);
            }
            Ok(())
        }
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
        fn gather_all(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
            Ok(vec![mine.to_vec()])
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
