//! Unit tests of the in-flight bookkeeping (the server itself is tested
//! against real engines and files in `block/tests`).

use super::*;

/// A not-started op of `n` iovecs of `each` bytes at `offset`.
fn pending(kind: IoKind, offset: u64, n: usize, each: usize) -> Pending {
    let v = libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: each,
    };
    let total = (n * each) as u64;
    Pending {
        parts: Vec::new(),
        kind,
        offset,
        remaining: total,
        total,
        iovecs: vec![v; n],
        first: 0,
        dirties: Vec::new(),
    }
}

#[test]
fn ops_merge_only_when_adjacent_alike_and_within_limits() {
    use IoKind::{Read, Sync, Write};
    let a = pending(Read, 4096, 2, 4096);
    assert!(a.continued_by(&pending(Read, 4096 + 8192, 1, 512)));
    // Not where it ends, the other direction, a flush.
    assert!(!a.continued_by(&pending(Read, 4096 + 8192 + 512, 1, 512)));
    assert!(!a.continued_by(&pending(Read, 0, 1, 4096)));
    assert!(!a.continued_by(&pending(Write, 4096 + 8192, 1, 512)));
    assert!(!pending(Sync, 0, 0, 0).continued_by(&pending(Sync, 0, 0, 0)));
    // Up to IOV_MAX iovecs and MAX_MERGED_BYTES, not one more.
    let many = pending(Write, 0, MAX_IOVECS - 1, 512);
    let end = many.total;
    assert!(many.continued_by(&pending(Write, end, 1, 512)));
    assert!(!many.continued_by(&pending(Write, end, 2, 512)));
    let big = pending(Write, 0, 1, (MAX_MERGED_BYTES - 4096) as usize);
    assert!(big.continued_by(&pending(Write, big.total, 1, 4096)));
    assert!(!big.continued_by(&pending(Write, big.total, 1, 8192)));
    // An op that moved some of its bytes already takes no more.
    let mut started = pending(Read, 0, 2, 4096);
    started.remaining = 4096;
    started.first = 1;
    assert!(!started.continued_by(&pending(Read, 8192, 1, 4096)));
    // Absorbing adds up the lengths and keeps the order.
    let mut a = pending(Read, 0, 2, 4096);
    a.absorb(pending(Read, 8192, 3, 512));
    assert_eq!(
        (a.total, a.remaining, a.iovecs.len()),
        (8192 + 1536, 8192 + 1536, 5)
    );
    assert_eq!(a.iovecs[2].iov_len, 512);
}

#[test]
fn advance_moves_across_iovecs() {
    let mut buf = [0u8; 64];
    let base = buf.as_mut_ptr();
    let mut v = vec![
        libc::iovec {
            iov_base: base.cast(),
            iov_len: 16,
        },
        libc::iovec {
            iov_base: base.wrapping_add(32).cast(),
            iov_len: 32,
        },
    ];
    let mut first = 0;
    advance(&mut v, &mut first, 20);
    assert_eq!(first, 1);
    assert_eq!(v[1].iov_base, base.wrapping_add(36).cast());
    assert_eq!(v[1].iov_len, 28);
    advance(&mut v, &mut first, 28);
    assert_eq!(first, 2);
    // Past the end: nothing happens.
    advance(&mut v, &mut first, 5);
    assert_eq!(first, 2);
}
