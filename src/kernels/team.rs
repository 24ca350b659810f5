//! A team of threads that runs one forward pass together.
//!
//! A forward pass is some fifty short layers. Handing each layer to a
//! thread pool costs a wake-up and a join per layer, which at batch 1 is a
//! large share of the pass (and much more when another process has the
//! idle core). Instead the pass starts `threads` threads once; every layer
//! is a *phase* whose work items the members share out (each starts on its
//! own contiguous part, then takes what others have not reached), and
//! members wait for each other at a spinning barrier between phases.
//!
//! Members write their items' outputs through [`Shared`], a buffer that
//! hands out disjoint ranges; phases are ordered by the barrier, so one
//! phase's writes are complete before the next phase reads them.

use std::marker::PhantomData;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Spins this many times before yielding while waiting at the barrier.
const SPINS: u32 = 1 << 11;

/// What the members of a team share.
struct Common {
    threads: usize,
    arrived: AtomicUsize,
    generation: AtomicUsize,
    /// Per phase, one counter per member: how far into that member's
    /// share of the items the team has got.
    counters: Vec<AtomicUsize>,
    /// Set when a member panics, so the others stop waiting for it.
    failed: AtomicBool,
}

/// One thread's handle on the team.
pub struct Member<'a> {
    index: usize,
    common: &'a Common,
    phase: usize,
}

/// Runs `body` on `threads` threads (the caller's and `threads − 1` more),
/// with room for up to `phases` calls of [`Member::share`]. Returns when
/// all have finished.
pub fn run<F>(threads: usize, phases: usize, body: F)
where
    F: Fn(&mut Member) + Sync,
{
    let threads = threads.max(1);
    let common = Common {
        threads,
        arrived: AtomicUsize::new(0),
        generation: AtomicUsize::new(0),
        counters: (0..phases * threads).map(|_| AtomicUsize::new(0)).collect(),
        failed: AtomicBool::new(false),
    };
    let member = |index: usize| {
        let mut member = Member {
            index,
            common: &common,
            phase: 0,
        };
        let guard = FailGuard(&common.failed);
        body(&mut member);
        std::mem::forget(guard);
    };
    if threads == 1 {
        return member(0);
    }
    std::thread::scope(|scope| {
        for index in 1..threads {
            let member = &member;
            std::thread::Builder::new()
                .name(format!("flukeid-team-{index}"))
                .spawn_scoped(scope, move || member(index))
                .expect("team thread starts");
        }
        member(0);
    });
}

/// Marks the team failed if a member unwinds.
struct FailGuard<'a>(&'a AtomicBool);

impl Drop for FailGuard<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

impl Member<'_> {
    /// This member's number, 0 for the calling thread.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Runs `work(i)` for each `i` in `0..count`, each exactly once, then
    /// waits until every member is done. Every member must call `share`
    /// the same number of times.
    ///
    /// Member `m` of `n` starts on items `m·count/n..(m+1)·count/n` in
    /// order, so when consecutive layers number their items the same way
    /// (by rows of the map) each thread reads mostly what it wrote itself,
    /// from its own cache. A member that finishes early takes the items
    /// others have not reached, so a member slowed down by another process
    /// does not hold up the team.
    pub fn share(&mut self, count: usize, mut work: impl FnMut(usize)) {
        let threads = self.common.threads;
        let counters = &self.common.counters[self.phase * threads..(self.phase + 1) * threads];
        self.phase += 1;
        for k in 0..threads {
            let owner = (self.index + k) % threads;
            let (first, end) = (owner * count / threads, (owner + 1) * count / threads);
            loop {
                let item = first + counters[owner].fetch_add(1, Ordering::Relaxed);
                if item >= end {
                    break;
                }
                work(item);
            }
        }
        self.wait();
    }

    /// The barrier between phases.
    fn wait(&self) {
        let common = self.common;
        let generation = common.generation.load(Ordering::Acquire);
        if common.arrived.fetch_add(1, Ordering::AcqRel) + 1 == common.threads {
            common.arrived.store(0, Ordering::Relaxed);
            common.generation.fetch_add(1, Ordering::Release);
            return;
        }
        let mut spins = 0;
        while common.generation.load(Ordering::Acquire) == generation {
            if common.failed.load(Ordering::Acquire) {
                panic!("another member of the forward-pass team panicked");
            }
            if spins < SPINS {
                std::hint::spin_loop();
                spins += 1;
            } else {
                std::thread::yield_now();
            }
        }
    }
}

/// A buffer the members of a team write in disjoint ranges.
pub struct Shared<'a> {
    ptr: *mut f32,
    len: usize,
    _buffer: PhantomData<&'a mut [f32]>,
}

// SAFETY: `Shared` only hands out ranges under the contracts of its unsafe
// methods, which rule out two threads touching the same value unordered.
unsafe impl Send for Shared<'_> {}
unsafe impl Sync for Shared<'_> {}

impl<'a> Shared<'a> {
    pub fn new(buffer: &'a mut [f32]) -> Self {
        Self {
            ptr: buffer.as_mut_ptr(),
            len: buffer.len(),
            _buffer: PhantomData,
        }
    }

    /// Values `range`, for reading.
    ///
    /// # Safety
    /// Nobody may write these values while the slice lives (in the team:
    /// the buffer is not written in the current phase).
    pub unsafe fn read(&self, range: Range<usize>) -> &[f32] {
        assert!(
            range.start <= range.end && range.end <= self.len,
            "shared read"
        );
        std::slice::from_raw_parts(self.ptr.add(range.start), range.end - range.start)
    }

    /// Values `range`, for writing.
    ///
    /// # Safety
    /// Nobody else may read or write these values while the slice lives (in
    /// the team: each work item writes its own range, and the buffer is not
    /// read in the current phase).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn write(&self, range: Range<usize>) -> &mut [f32] {
        assert!(
            range.start <= range.end && range.end <= self.len,
            "shared write"
        );
        std::slice::from_raw_parts_mut(self.ptr.add(range.start), range.end - range.start)
    }

    /// A pointer to value `start`, valid for `len` values, for work items
    /// that write interleaved (not contiguous) parts of a range.
    ///
    /// # Safety
    /// As [`Shared::write`], for each value written through the pointer.
    pub unsafe fn write_ptr(&self, start: usize, len: usize) -> *mut f32 {
        assert!(start <= self.len && len <= self.len - start, "shared write");
        self.ptr.add(start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_item_of_every_phase_runs_once_and_phases_are_ordered() {
        for threads in [1, 2, 3] {
            let mut values = vec![0f32; 1000];
            let shared = Shared::new(&mut values);
            run(threads, 3, |member| {
                // Phase 1 writes i, phase 2 doubles, phase 3 adds the
                // neighbour written by (possibly) another member in phase 2.
                member.share(1000, |i| unsafe { shared.write(i..i + 1)[0] = i as f32 });
                member.share(100, |chunk| {
                    for v in unsafe { shared.write(chunk * 10..chunk * 10 + 10) } {
                        *v *= 2.0;
                    }
                });
                member.share(1, |_| {
                    let all = unsafe { shared.write(0..1000) };
                    all[0] += all[999];
                });
            });
            assert_eq!(values[1], 2.0);
            assert_eq!(values[999], 1998.0);
            assert_eq!(values[0], 1998.0, "{threads} threads");
        }
    }

    #[test]
    fn members_start_on_their_own_share_and_take_over_a_stalled_one() {
        use std::sync::atomic::AtomicUsize;
        const ITEMS: usize = 1000;
        const NOBODY: usize = usize::MAX;
        let ran_by: Vec<AtomicUsize> = (0..ITEMS).map(|_| AtomicUsize::new(NOBODY)).collect();
        let runs: Vec<AtomicUsize> = (0..ITEMS).map(|_| AtomicUsize::new(0)).collect();
        run(2, 1, |member| {
            let me = member.index();
            member.share(ITEMS, |i| {
                let start = std::time::Instant::now();
                let waiting = |item: usize| {
                    ran_by[item].load(Ordering::Relaxed) == NOBODY && start.elapsed().as_secs() < 10
                };
                if i == ITEMS / 2 {
                    // Member 1 lets member 0 start first.
                    while waiting(0) {
                        std::thread::yield_now();
                    }
                }
                runs[i].fetch_add(1, Ordering::Relaxed);
                ran_by[i].store(me, Ordering::Relaxed);
                if i == 0 {
                    // Member 0 stalls on its first item until member 1,
                    // done with its own half, has taken the rest of member
                    // 0's (or ten seconds pass, and the asserts fail).
                    while waiting(ITEMS / 2 - 1) {
                        std::thread::yield_now();
                    }
                }
            });
        });
        assert!(runs.iter().all(|r| r.load(Ordering::Relaxed) == 1));
        let owner = |i: usize| ran_by[i].load(Ordering::Relaxed);
        // Member 1 started on the second half; member 0 took item 0 first.
        assert_eq!(owner(0), 0);
        assert_eq!(owner(ITEMS / 2), 1);
        // Member 1 took over member 0's share while it stalled.
        assert_eq!(owner(ITEMS / 2 - 1), 1);
        assert_eq!(owner(1), 1);
    }

    #[test]
    fn a_panicking_member_fails_the_team_instead_of_hanging_it() {
        let outcome = std::panic::catch_unwind(|| {
            run(2, 2, |member| {
                let me = member.index();
                member.share(2, |i| assert!(!(me == 1 || i == 1), "item fails"));
                member.share(1, |_| {});
            })
        });
        assert!(outcome.is_err());
    }
}
