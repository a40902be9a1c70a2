//! The tracker on its own instances; the process-wide one in a test that
//! holds [`super::test_lock`].

use super::*;

const MIB: u64 = 1 << 20;

/// The set pages of `words`, ascending.
fn pages(words: &[u64]) -> Vec<u64> {
    let mut v = Vec::new();
    for (i, &w) in words.iter().enumerate() {
        for bit in 0..64 {
            if w & (1 << bit) != 0 {
                v.push(i as u64 * 64 + bit);
            }
        }
    }
    v
}

/// 1 MiB at 0 and 2 MiB at 4 GiB (a gap between): pages 0..256 and 256..768.
fn gapped() -> DirtyTracker {
    DirtyTracker::new(&[(GuestAddress(1 << 32), 2 * MIB), (GuestAddress(0), MIB)])
}

#[test]
fn pages_are_numbered_across_ranges_in_address_order() {
    let t = gapped();
    assert_eq!(t.pages(), 768);
    t.mark(GuestAddress(0), 1);
    t.mark(GuestAddress(MIB - 1), 1);
    t.mark(GuestAddress(1 << 32), 1);
    t.mark(GuestAddress((1 << 32) + 5 * PAGE_SIZE + 17), 8);
    let words = t.take();
    assert_eq!(words.len(), 12);
    assert_eq!(pages(&words), vec![0, 255, 256, 261]);
}

#[test]
fn marks_straddling_pages_and_range_ends_are_clipped_to_ram() {
    let t = gapped();
    // Two bytes across the page 2/3 boundary.
    t.mark(GuestAddress(3 * PAGE_SIZE - 1), 2);
    // The end of the first range, into the gap and on into the second.
    t.mark(GuestAddress(MIB - 10), (1 << 32) - MIB + 20);
    // The end of the second range and beyond.
    t.mark(GuestAddress((1 << 32) + 2 * MIB - 1), 4 * PAGE_SIZE);
    assert_eq!(pages(&t.take()), vec![2, 3, 255, 256, 767]);
}

#[test]
fn a_long_mark_sets_whole_words() {
    let t = gapped();
    // Pages 10..=700 from within page 10 to within page 700 (second range).
    let from = 10 * PAGE_SIZE + 5;
    let to = (1 << 32) + (700 - 256) * PAGE_SIZE + 1;
    t.mark(GuestAddress(from), to - from);
    // The gap has no pages: 10..=255 then 256..=700.
    assert_eq!(pages(&t.take()), (10..=700).collect::<Vec<_>>());
}

#[test]
fn out_of_range_and_overflowing_values_are_ignored() {
    let t = gapped();
    t.mark(GuestAddress(MIB), PAGE_SIZE); // in the gap
    t.mark(GuestAddress((1 << 32) + 2 * MIB), u64::MAX); // past RAM
    t.mark(GuestAddress(u64::MAX), u64::MAX); // overflows
    t.mark(GuestAddress(u64::MAX - 1), 1);
    t.mark(GuestAddress(PAGE_SIZE), 0); // nothing
    assert!(pages(&t.take()).is_empty());
    // Overflowing lengths saturate: from page 255 to the end of RAM.
    t.mark(GuestAddress(MIB - 1), u64::MAX);
    assert_eq!(pages(&t.take()), (255..768).collect::<Vec<_>>());
}

#[test]
fn take_clears() {
    let t = gapped();
    t.mark(GuestAddress(7 * PAGE_SIZE), 1);
    assert_eq!(pages(&t.take()), vec![7]);
    assert!(pages(&t.take()).is_empty());
    t.mark(GuestAddress(8 * PAGE_SIZE), 1);
    assert_eq!(pages(&t.take()), vec![8]);
}

#[test]
fn ranges_not_page_multiples_share_a_page() {
    // 4 KiB + 100 bytes, then 4 KiB: the second range starts at RAM offset
    // 4196, inside page 1, as the memory file lays them out.
    let t = DirtyTracker::new(&[
        (GuestAddress(0), PAGE_SIZE + 100),
        (GuestAddress(0x10_0000), PAGE_SIZE),
    ]);
    assert_eq!(t.pages(), 3);
    t.mark(GuestAddress(0x10_0000), 1);
    assert_eq!(pages(&t.take()), vec![1]);
    t.mark(GuestAddress(0x10_0000 + PAGE_SIZE - 1), 1);
    assert_eq!(pages(&t.take()), vec![2]);
}

#[test]
fn no_ram_no_pages() {
    let t = DirtyTracker::new(&[]);
    t.mark(GuestAddress(0), u64::MAX);
    assert!(t.take().is_empty());
}

#[test]
fn marks_from_many_threads_all_land() {
    let t = DirtyTracker::new(&[(GuestAddress(0), 64 * MIB)]);
    std::thread::scope(|s| {
        for k in 0..4u64 {
            let t = &t;
            s.spawn(move || {
                for p in (k..16384).step_by(4) {
                    t.mark(GuestAddress(p * PAGE_SIZE), 1);
                }
            });
        }
    });
    assert_eq!(pages(&t.take()), (0..16384).collect::<Vec<_>>());
}

/// The process-wide tracker: off is a no-op, on records, stop forgets.
/// Its range sits far above what other tests mark, so their marks (they run
/// at the same time) fall outside it.
#[test]
fn the_global_tracker_is_off_until_started() {
    let _g = test_lock();
    const BASE: u64 = 0x7100_0000_0000;
    assert!(!is_tracking());
    mark(GuestAddress(BASE), 1);
    assert!(take().is_empty(), "off: nothing to take");
    start(&[(GuestAddress(BASE), MIB)]);
    assert!(is_tracking());
    assert!(
        pages(&take()).is_empty(),
        "writes before start are not marked"
    );
    mark(GuestAddress(BASE + 3 * PAGE_SIZE), 1);
    assert_eq!(pages(&take()), vec![3]);
    // A new start replaces the bitmap, cleared.
    mark(GuestAddress(BASE), 1);
    start(&[(GuestAddress(BASE), 2 * MIB)]);
    mark(GuestAddress(BASE + MIB), 1);
    assert_eq!(pages(&take()), vec![256]);
    stop();
    assert!(!is_tracking());
    mark(GuestAddress(BASE), 1);
    assert!(take().is_empty());
}
