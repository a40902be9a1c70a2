//! Connections from the writer to one replica: a small pool, so that many
//! requests of one volume are in flight to that replica at once (one per
//! connection; the replica serves each connection in its own thread).
//!
//! Ordering between requests is not the pool's business: overlapping
//! writes never travel at the same time (the writer's [`super::order`]
//! tracker holds a write until the earlier overlapping one is done), so
//! two requests in flight on different connections commute.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};

use crate::error::{Error, Result};
use crate::proto::{Request, Response};
use crate::transport::{Connector, Link};

/// Most connections one writer keeps open to one replica of one volume at
/// once (a vhost-user-blk export serves 32 requests at a time); further
/// requests wait for one to come back. A daemon accepts
/// [`crate::server::MAX_PEER_CONNECTIONS`] in all: when it refuses one,
/// a request waits for a link of the pool instead of failing, as long as
/// the pool has one in use.
pub const MAX_LINKS: usize = 32;

/// The pool of links to one replica.
pub(crate) struct PeerLinks {
    pub node: String,
    pub addr: String,
    state: Mutex<Pool>,
    freed: Condvar,
    /// Set once the replica answered a `WriteBatch` as a kiln-store that
    /// predates it does (during a rolling update): its writes then go one
    /// by one. Forgotten by [`PeerLinks::clear`] (an upgraded replica
    /// restarts, which fails it and clears its links).
    no_batches: AtomicBool,
}

#[derive(Default)]
struct Pool {
    idle: Vec<Link>,
    /// Links handed out or idle.
    open: usize,
    /// Bumped by [`PeerLinks::clear`]: links handed out before are not
    /// taken back (they may lead to a replica that failed).
    generation: u64,
}

/// A link taken from the pool, with a request in flight on it.
pub(crate) struct InFlight {
    link: Link,
    generation: u64,
}

impl InFlight {
    /// Spins up to `spin` for the answer ([`crate::transport::poll`]);
    /// whether it arrived meanwhile.
    pub fn poll(&mut self, spin: std::time::Duration) -> bool {
        self.link.spin_until_readable(spin)
    }
}

impl PeerLinks {
    pub fn new(node: &str, addr: &str) -> PeerLinks {
        PeerLinks {
            node: node.to_string(),
            addr: addr.to_string(),
            state: Mutex::new(Pool::default()),
            freed: Condvar::new(),
            no_batches: AtomicBool::new(false),
        }
    }

    fn pool(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.state.lock().expect(crate::POISONED)
    }

    /// An idle link, or a new connection (waiting while [`MAX_LINKS`] are
    /// out).
    fn take(&self, connector: &dyn Connector) -> Result<(Link, u64)> {
        let mut pool = self.pool();
        loop {
            while let Some(l) = pool.idle.pop() {
                if !l.idle_too_long() {
                    return Ok((l, pool.generation));
                }
                pool.open -= 1;
            }
            if pool.open < MAX_LINKS {
                pool.open += 1;
                let generation = pool.generation;
                drop(pool);
                let e = match connector.connect(&self.node, &self.addr) {
                    Ok(c) => return Ok((Link::peer(c), generation)),
                    Err(e) => e,
                };
                pool = self.pool();
                if generation == pool.generation {
                    pool.open -= 1;
                }
                // Refused (the replica's connection limit, say) while other
                // links to it work: wait for one of those. None in use: the
                // replica is unreachable.
                if pool.open == 0 || generation != pool.generation {
                    return Err(e);
                }
            }
            pool = self.freed.wait(pool).expect(crate::POISONED);
        }
    }

    /// Gives a link back (`None`: it broke and is dropped).
    fn release(&self, link: Option<Link>, generation: u64) {
        let mut pool = self.pool();
        if generation != pool.generation {
            // Counted in an older generation, already forgotten.
            return;
        }
        match link {
            Some(l) => pool.idle.push(l),
            None => pool.open -= 1,
        }
        drop(pool);
        self.freed.notify_one();
    }

    /// Sends `req` and waits for the answer.
    pub fn call(&self, connector: &dyn Connector, req: &Request) -> Result<Response> {
        let f = self.start(connector, req)?;
        self.finish(f)
    }

    /// Sends `req` on a link of the pool without waiting for the answer
    /// ([`PeerLinks::finish`] reads it).
    pub fn start(&self, connector: &dyn Connector, req: &Request) -> Result<InFlight> {
        let (mut link, generation) = self.take(connector)?;
        match link.send(req) {
            Ok(()) => Ok(InFlight { link, generation }),
            Err(e) => {
                self.release(None, generation);
                Err(e)
            }
        }
    }

    /// [`PeerLinks::start`] for a request encoded already (one encoding
    /// sent to every replica).
    pub fn start_encoded(
        &self,
        connector: &dyn Connector,
        body: &[u8],
        deadline: std::time::Duration,
    ) -> Result<InFlight> {
        let (mut link, generation) = self.take(connector)?;
        match link.send_encoded(body, deadline) {
            Ok(()) => Ok(InFlight { link, generation }),
            Err(e) => {
                self.release(None, generation);
                Err(e)
            }
        }
    }

    /// Reads the answer of a request in flight; the link goes back to the
    /// pool unless the connection failed.
    pub fn finish(&self, mut f: InFlight) -> Result<Response> {
        let r = f.link.recv();
        let broken = matches!(r, Err(Error::Unavailable(_)) | Err(Error::Protocol(_)));
        self.release((!broken).then_some(f.link), f.generation);
        r
    }

    /// Whether the replica takes [`Request::WriteBatch`] (as far as is
    /// known: until it refused one).
    pub fn takes_batches(&self) -> bool {
        !self.no_batches.load(Ordering::Relaxed)
    }

    /// Records that the replica refused a [`Request::WriteBatch`] as an
    /// older kiln-store does; whether this is news.
    pub fn refused_batches(&self) -> bool {
        !self.no_batches.swap(true, Ordering::Relaxed)
    }

    /// Drops every idle link and forgets the ones handed out (a replica
    /// that failed: the next request connects afresh).
    pub fn clear(&self) {
        self.no_batches.store(false, Ordering::Relaxed);
        let mut pool = self.pool();
        pool.idle.clear();
        pool.open = 0;
        pool.generation += 1;
        drop(pool);
        self.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::Conn;
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// Connects to an in-test server answering every request with `Ok`.
    struct Echo {
        connects: AtomicUsize,
    }

    impl Connector for Echo {
        fn connect(&self, _node: &str, _addr: &str) -> Result<Box<dyn Conn>> {
            self.connects.fetch_add(1, Ordering::SeqCst);
            let (a, mut b) = UnixStream::pair()?;
            std::thread::spawn(move || {
                while let Ok(Some(_)) = crate::proto::read_frame(&mut b) {
                    if crate::proto::send(&mut b, crate::proto::Kind::Response, &Response::Ok)
                        .is_err()
                    {
                        return;
                    }
                }
            });
            Ok(Box::new(a))
        }
    }

    fn req() -> Request {
        Request::ReplicaInfo { name: "v".into() }
    }

    #[test]
    fn links_are_reused_and_several_are_in_flight_at_once() {
        let c = Echo {
            connects: AtomicUsize::new(0),
        };
        let p = PeerLinks::new("n", "a");
        assert!(matches!(p.call(&c, &req()), Ok(Response::Ok)));
        assert!(matches!(p.call(&c, &req()), Ok(Response::Ok)));
        assert_eq!(c.connects.load(Ordering::SeqCst), 1);
        let a = p.start(&c, &req()).unwrap();
        let b = p.start(&c, &req()).unwrap();
        assert_eq!(c.connects.load(Ordering::SeqCst), 2);
        assert!(matches!(p.finish(b), Ok(Response::Ok)));
        assert!(matches!(p.finish(a), Ok(Response::Ok)));
        p.clear();
        assert!(matches!(p.call(&c, &req()), Ok(Response::Ok)));
        assert_eq!(c.connects.load(Ordering::SeqCst), 3);
    }

    /// Refuses every connection after the first `n`.
    struct Limited {
        inner: Echo,
        n: usize,
    }

    impl Connector for Limited {
        fn connect(&self, node: &str, addr: &str) -> Result<Box<dyn Conn>> {
            if self.inner.connects.load(Ordering::SeqCst) >= self.n {
                return Err(Error::Unavailable("too many connections".into()));
            }
            self.inner.connect(node, addr)
        }
    }

    #[test]
    fn a_refused_connection_waits_for_a_link_in_use() {
        let c = Arc::new(Limited {
            inner: Echo {
                connects: AtomicUsize::new(0),
            },
            n: 1,
        });
        let p = Arc::new(PeerLinks::new("n", "a"));
        let held = p.start(c.as_ref(), &req()).unwrap();
        let (p2, c2) = (p.clone(), c.clone());
        let waiter = std::thread::spawn(move || p2.call(c2.as_ref(), &req()).is_ok());
        p.finish(held).unwrap();
        assert!(waiter.join().unwrap());
        // With no link in use, a refusal is an error.
        p.clear();
        assert!(p.call(c.as_ref(), &req()).is_err());
    }

    #[test]
    fn the_pool_is_bounded() {
        let c = Arc::new(Echo {
            connects: AtomicUsize::new(0),
        });
        let p = Arc::new(PeerLinks::new("n", "a"));
        let held: Vec<_> = (0..MAX_LINKS)
            .map(|_| p.start(c.as_ref(), &req()).unwrap())
            .collect();
        let (p2, c2) = (p.clone(), c.clone());
        let waiter = std::thread::spawn(move || p2.call(c2.as_ref(), &req()).is_ok());
        // The waiter can only finish once a link comes back.
        for f in held {
            p.finish(f).unwrap();
        }
        assert!(waiter.join().unwrap());
        assert_eq!(c.connects.load(Ordering::SeqCst), MAX_LINKS);
    }

    /// A replica that refused a write batch gets single writes until its
    /// links are cleared (it restarted, perhaps upgraded); the refusal is
    /// news once.
    #[test]
    fn a_refused_batch_is_remembered_until_the_links_are_cleared() {
        let p = PeerLinks::new("n", "a");
        assert!(p.takes_batches());
        assert!(p.refused_batches());
        assert!(!p.refused_batches(), "told twice");
        assert!(!p.takes_batches());
        p.clear();
        assert!(p.takes_batches());
    }
}
