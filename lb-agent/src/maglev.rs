//! Maglev consistent hashing (Eisenbud et al., NSDI 2016) with Katran's weighted fill.
//!
//! The table maps a flow hash (mod `size`) to a backend. Every backend owns a
//! pseudo-random permutation of the slots derived from its name alone, so a
//! backend keeps (almost) all of its slots when others come and go, and the
//! agent and any other process compute the same table from the same config.

use lb_common::NO_BACKEND;

/// A backend as Maglev sees it: a stable name and a weight (0 = not in the table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MaglevBackend<'a> {
    /// Stable identity; the backend's permutation is derived from it only.
    pub name: &'a str,
    /// Relative weight; 0 keeps the backend out of the table.
    pub weight: u32,
}

/// Builds a table of `size` slots (prime); each slot holds the index (into `backends`) of the backend that owns it, or NO_BACKEND when no backend has weight > 0.
///
/// A non-prime `size` still yields a full table, but without Maglev's balance
/// and stability guarantees.
pub fn build(backends: &[MaglevBackend<'_>], size: u32) -> Vec<u32> {
    let mut table = vec![NO_BACKEND; size as usize];
    let m = u64::from(size);

    let mut turns: Vec<Turn<'_>> = backends
        .iter()
        .enumerate()
        .filter(|(_, b)| b.weight > 0)
        .map(|(index, b)| Turn::new(index as u32, b, m))
        .collect();
    if turns.is_empty() || table.is_empty() {
        return table;
    }
    // Who goes first in a round decides contested slots, so the order must
    // come from the names, not from the caller's list; the hash keeps that
    // priority uncorrelated with naming schemes like master01, master02.
    // Entries equal in all three keys are interchangeable for the result.
    turns.sort_by(|a, b| (a.hash, a.name, a.weight).cmp(&(b.hash, b.name, b.weight)));

    let max_weight = turns.iter().map(|t| t.weight).max().unwrap_or(1);
    let mut filled = 0usize;
    // Slots are never freed, so the first free slot only moves forward; this
    // keeps the non-prime fallback below linear overall.
    let mut first_free = 0usize;
    loop {
        // Katran's weighted round: everyone earns its weight, and takes a turn
        // whenever it has saved up max_weight, so turns (= slots) per backend
        // are proportional to weight and the heaviest backend moves every round.
        for turn in turns.iter_mut() {
            turn.credit += turn.weight;
            if turn.credit < max_weight {
                continue;
            }
            turn.credit -= max_weight;
            let slot = match turn.next_free(&table) {
                Some(slot) => slot,
                None => {
                    while table[first_free] != NO_BACKEND {
                        first_free += 1;
                    }
                    first_free
                }
            };
            table[slot] = turn.index;
            filled += 1;
            if filled == table.len() {
                return table;
            }
        }
    }
}

/// Per-backend fill state.
struct Turn<'a> {
    index: u32,
    name: &'a str,
    hash: u64,
    weight: u64,
    credit: u64,
    /// Next candidate slot in this backend's permutation.
    cursor: u64,
    skip: u64,
    /// Permutation entries consumed; a prime size guarantees a free slot
    /// before this reaches the size.
    tried: u64,
}

impl<'a> Turn<'a> {
    fn new(index: u32, backend: &MaglevBackend<'a>, m: u64) -> Self {
        let hash = fnv1a64(backend.name.as_bytes());
        let (offset, skip) = permutation(hash, m);
        Turn {
            index,
            name: backend.name,
            hash,
            weight: u64::from(backend.weight),
            credit: 0,
            cursor: offset,
            skip,
            tried: 0,
        }
    }

    /// Walks this backend's permutation to its next free slot.
    fn next_free(&mut self, table: &[u32]) -> Option<usize> {
        let m = table.len() as u64;
        while self.tried < m {
            let slot = self.cursor as usize;
            self.cursor = (self.cursor + self.skip) % m;
            self.tried += 1;
            if table[slot] == NO_BACKEND {
                return Some(slot);
            }
        }
        // Only reachable for a non-prime size, where the permutation is not a
        // full cycle; the caller falls back to any free slot.
        None
    }
}

/// Offset and skip of a backend's permutation `offset + j * skip (mod m)`.
fn permutation(name_hash: u64, m: u64) -> (u64, u64) {
    if m <= 1 {
        return (0, 1);
    }
    let offset = mix_offset(name_hash) % m;
    // skip in 1..m, so for a prime m the permutation visits every slot.
    let skip = mix_skip(name_hash) % (m - 1) + 1;
    (offset, skip)
}

// The hashes below are part of the table's definition: changing any constant
// reshuffles every VIP on upgrade, so they are written out here rather than
// taken from a library whose output may change between versions or platforms.

/// FNV-1a, 64-bit.
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// splitmix64's finalizer (Stafford's Mix13 constants).
fn mix_offset(h: u64) -> u64 {
    let mut z = h.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A second splitmix64-style finalizer (MurmurHash3 fmix64 constants, different
/// increment) so skip is independent of offset.
fn mix_skip(h: u64) -> u64 {
    let mut z = h.wrapping_add(0x632b_e59b_d9b4_e019);
    z = (z ^ (z >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
    z = (z ^ (z >> 33)).wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    z ^ (z >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const M: u32 = 65537;

    fn names(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("master{i:02}")).collect()
    }

    fn equal(names: &[String]) -> Vec<MaglevBackend<'_>> {
        names
            .iter()
            .map(|n| MaglevBackend {
                name: n,
                weight: 100,
            })
            .collect()
    }

    /// Slot -> owner name, which is what must be stable (indices are not).
    fn owners<'a>(backends: &[MaglevBackend<'a>], table: &[u32]) -> Vec<Option<&'a str>> {
        table
            .iter()
            .map(|&i| (i != NO_BACKEND).then(|| backends[i as usize].name))
            .collect()
    }

    fn counts(backends: &[MaglevBackend<'_>], table: &[u32]) -> Vec<usize> {
        let mut c = vec![0usize; backends.len()];
        for &i in table {
            c[i as usize] += 1;
        }
        c
    }

    fn table_bytes(table: &[u32]) -> Vec<u8> {
        table.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn identical_across_processes() {
        let names = names(3);
        let backends = equal(&names);
        let table = build(&backends, M);
        if let Ok(out) = std::env::var("LB_MAGLEV_CHILD") {
            std::fs::write(out, table_bytes(&table)).expect("child writes table");
            return;
        }
        // libtest names tests by module path without the crate name.
        let module = module_path!()
            .split_once("::")
            .map_or(module_path!(), |(_, rest)| rest);
        let test_name = format!("{module}::identical_across_processes");
        let out = std::env::temp_dir().join(format!("lb-maglev-child-{}.bin", std::process::id()));
        let _ = std::fs::remove_file(&out);
        let status = std::process::Command::new(std::env::current_exe().expect("current exe"))
            .args(["--exact", &test_name, "--nocapture"])
            .env("LB_MAGLEV_CHILD", &out)
            .stdout(std::process::Stdio::null())
            .status()
            .expect("spawn child test process");
        assert!(status.success(), "child test failed: {status}");
        let child = std::fs::read(&out).expect("child wrote its table (did the test name match?)");
        let _ = std::fs::remove_file(&out);
        assert_eq!(child.len(), M as usize * 4);
        assert!(
            child == table_bytes(&table),
            "tables differ between processes"
        );
        println!("cross-process: {} bytes identical", child.len());
    }

    #[test]
    fn hash_is_pinned() {
        // Known FNV-1a 64 vectors, and the current offsets/skips: a change here
        // reshuffles every deployed table, so it must be deliberate.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
        let perms: Vec<(u64, u64)> = names(3)
            .iter()
            .map(|n| permutation(fnv1a64(n.as_bytes()), u64::from(M)))
            .collect();
        println!("permutations (offset, skip) for master01..03 at M={M}: {perms:?}");
        assert_eq!(perms, PINNED_PERMS);
        // Pins the fill order as well as the hashes.
        let names = names(3);
        let digest = fnv1a64(&table_bytes(&build(&equal(&names), M)));
        println!("table digest for master01..03 at M={M}: {digest:#018x}");
        assert_eq!(digest, PINNED_TABLE_DIGEST);
    }

    const PINNED_TABLE_DIGEST: u64 = 0x70e5_727b_8939_5a54;
    const PINNED_PERMS: [(u64, u64); 3] = [(17342, 9156), (28445, 39491), (38503, 56174)];

    fn assert_shares(weights: &[u32]) {
        let names = names(weights.len());
        let backends: Vec<MaglevBackend<'_>> = names
            .iter()
            .zip(weights)
            .map(|(n, &w)| MaglevBackend { name: n, weight: w })
            .collect();
        let table = build(&backends, M);
        let total_weight: u32 = weights.iter().sum();
        let mut worst = 0f64;
        for (b, c) in backends.iter().zip(counts(&backends, &table)) {
            let share = c as f64 / f64::from(M);
            let want = f64::from(b.weight) / f64::from(total_weight);
            let dev = (share - want).abs();
            worst = worst.max(dev);
            assert!(
                dev <= 0.01,
                "{}: share {share:.5} vs weight share {want:.5}",
                b.name
            );
        }
        println!(
            "shares for weights {weights:?} at M={M}: worst |share - weight share| = {worst:.6}"
        );
    }

    #[test]
    fn shares_follow_weights() {
        assert_shares(&[100; 3]);
        assert_shares(&[100; 7]);
        assert_shares(&[100, 200, 300, 50]);
        assert_shares(&[1, 10_000, 5_000]);
    }

    #[test]
    fn removal_moves_only_the_removed_backends_slots() {
        for n in [3usize, 5, 10] {
            let names = names(n);
            let full = equal(&names);
            let before = owners(&full, &build(&full, M));
            let mut worst = 0usize;
            for removed in 0..n {
                let rest: Vec<MaglevBackend<'_>> = full
                    .iter()
                    .enumerate()
                    .filter(|&(i, _)| i != removed)
                    .map(|(_, b)| *b)
                    .collect();
                let after = owners(&rest, &build(&rest, M));
                let gone = Some(full[removed].name);
                let moved = before
                    .iter()
                    .zip(&after)
                    .filter(|(b, a)| b != a && **b != gone)
                    .count();
                assert!(after.iter().all(|o| o.is_some() && *o != gone));
                assert!(
                    moved as f64 <= 0.01 * f64::from(M),
                    "N={n}, removing {}: {moved} other slots moved",
                    full[removed].name
                );
                worst = worst.max(moved);
            }
            println!(
                "removal N={n}: worst extra slots moved = {worst} ({:.4}% of M)",
                100.0 * worst as f64 / f64::from(M)
            );
        }
    }

    #[test]
    fn order_does_not_matter() {
        let names = names(10);
        let backends: Vec<MaglevBackend<'_>> = names
            .iter()
            .enumerate()
            .map(|(i, n)| MaglevBackend {
                name: n,
                weight: 50 + 37 * i as u32 % 200,
            })
            .collect();
        let reference = owners(&backends, &build(&backends, M));
        let mut shuffled = backends.clone();
        shuffled.reverse();
        shuffled.rotate_left(3);
        shuffled.swap(0, 5);
        assert_ne!(shuffled, backends);
        assert_eq!(owners(&shuffled, &build(&shuffled, M)), reference);
    }

    #[test]
    fn empty_or_all_zero_weights_give_no_backend() {
        assert!(build(&[], M).iter().all(|&s| s == NO_BACKEND));
        let names = names(3);
        let drained: Vec<MaglevBackend<'_>> = names
            .iter()
            .map(|n| MaglevBackend { name: n, weight: 0 })
            .collect();
        let table = build(&drained, M);
        assert_eq!(table.len(), M as usize);
        assert!(table.iter().all(|&s| s == NO_BACKEND));
    }

    #[test]
    fn zero_weight_backend_gets_no_slots() {
        let names = names(4);
        let mut backends = equal(&names);
        backends[2].weight = 0;
        let table = build(&backends, M);
        let c = counts(&backends, &table);
        assert_eq!(c[2], 0);
        assert_eq!(c.iter().sum::<usize>(), M as usize);
        // A drained backend is as good as absent: nobody else's slots change.
        let without: Vec<MaglevBackend<'_>> =
            backends.iter().filter(|b| b.weight > 0).copied().collect();
        assert_eq!(
            owners(&backends, &table),
            owners(&without, &build(&without, M))
        );
    }

    #[test]
    fn single_backend_owns_every_slot() {
        let table = build(
            &[MaglevBackend {
                name: "only",
                weight: 1,
            }],
            M,
        );
        assert!(table.iter().all(|&s| s == 0));
    }

    #[test]
    fn degenerate_sizes_terminate() {
        let names = names(3);
        let backends = equal(&names);
        assert!(build(&backends, 0).is_empty());
        assert_eq!(build(&backends, 1).len(), 1);
        for size in [4u32, 100, 65536] {
            let table = build(&backends, size);
            assert!(table.iter().all(|&s| s < 3), "size {size}");
        }
    }

    #[test]
    fn large_build_timing() {
        let names: Vec<String> = (0..1000).map(|i| format!("backend-{i:04}")).collect();
        let backends: Vec<MaglevBackend<'_>> = names
            .iter()
            .enumerate()
            .map(|(i, n)| MaglevBackend {
                name: n,
                weight: if i == 0 { 10_000 } else { 1 + i as u32 % 100 },
            })
            .collect();
        let start = std::time::Instant::now();
        let table = build(&backends, M);
        let uneven = start.elapsed();
        assert!(table.iter().all(|&s| s != NO_BACKEND));
        let equal = equal(&names);
        let start = std::time::Instant::now();
        let table = build(&equal, M);
        let even = start.elapsed();
        let per: HashMap<u32, usize> = table.iter().fold(HashMap::new(), |mut m, &s| {
            *m.entry(s).or_default() += 1;
            m
        });
        assert_eq!(per.len(), 1000);
        println!("build 1000 backends at M={M}: equal weights {even:?}, skewed weights {uneven:?}");
    }
}
