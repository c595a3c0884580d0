//! Data parallelism across processes, launched the way torchrun or Slurm launch them: one
//! process per device with `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`
//! (or `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`). Each rank trains on its slice
//! `batch[rank::world]` of the same global order; gradients are summed across ranks before
//! clipping, so every rank applies the same update and the weights stay identical.
//!
//! The transport here is a TCP star through rank 0: it carries the CPU engine's all-reduce (in
//! rank order, so the sums are deterministic), the loss scalars, and NCCL's unique id for the
//! CUDA engine, which then all-reduces gradients on the GPUs.
//!
//! Under torchrun, `MASTER_ADDR:MASTER_PORT` is taken: torchrun's agent serves its c10d
//! TCPStore there for the workers to share (`TORCHELASTIC_USE_AGENT_STORE=True`). Rank 0 then
//! listens on a free port and publishes it in that store, where the other ranks read it, as
//! PyTorch's own workers meet through the same store.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// This process's place in the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct World {
    pub rank: usize,
    pub size: usize,
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// torchrun's agent serves a TCPStore at `MASTER_ADDR:MASTER_PORT`, for the workers to
    /// meet through: its attempt (`TORCHELASTIC_RESTART_COUNT`, as the store outlives a restart
    /// of the workers); `None` where the port is this job's own (Slurm, a launcher of one's own).
    pub agent_store: Option<u64>,
}

impl World {
    pub fn single() -> World {
        World {
            rank: 0,
            size: 1,
            local_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: 29500,
            agent_store: None,
        }
    }

    /// Reads torchrun's variables, else Slurm's, else a single process.
    pub fn from_env() -> Result<World> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<World> {
        let num = |k: &str| -> Result<Option<usize>> {
            var(k)
                .map(|v| {
                    v.trim()
                        .parse::<usize>()
                        .with_context(|| format!("{k}=`{v}` is not a number"))
                })
                .transpose()
        };
        let (rank, size, local) = match (num("RANK")?, num("WORLD_SIZE")?) {
            (Some(r), Some(w)) => (r, w, num("LOCAL_RANK")?.unwrap_or(r)),
            (None, None) => match (num("SLURM_PROCID")?, num("SLURM_NTASKS")?) {
                (Some(r), Some(w)) => (r, w, num("SLURM_LOCALID")?.unwrap_or(r)),
                _ => return Ok(World::single()),
            },
            _ => bail!("RANK and WORLD_SIZE must be set together"),
        };
        if size == 0 || rank >= size {
            bail!("rank {rank} is not below the world size {size}");
        }
        let master_port = match var("MASTER_PORT") {
            Some(p) => p
                .trim()
                .parse()
                .with_context(|| format!("MASTER_PORT=`{p}`"))?,
            None => 29500,
        };
        let master_addr = var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        if size > 1 && var("MASTER_ADDR").is_none() && var("SLURM_PROCID").is_some() {
            // Slurm does not set MASTER_ADDR; the usual recipe exports the first node's name.
            bail!("MASTER_ADDR is not set: export it (e.g. the first host of $SLURM_JOB_NODELIST)");
        }
        let agent_store = match var("TORCHELASTIC_USE_AGENT_STORE").as_deref() {
            Some("True") => Some(num("TORCHELASTIC_RESTART_COUNT")?.unwrap_or(0) as u64),
            _ => None,
        };
        Ok(World {
            rank,
            size,
            local_rank: local,
            master_addr,
            master_port,
            agent_store,
        })
    }
}

/// The TCP star: rank 0 holds a stream to every other rank (in rank order); the others hold one
/// stream to rank 0.
pub struct Tcp {
    pub rank: usize,
    pub size: usize,
    peers: Vec<TcpStream>,
    /// Rank 0's address and port.
    at: String,
}

/// Rank 0's side of the star: a stream from each other rank, in rank order, or an error naming
/// the ranks that have not joined by `deadline` (or when a signal asks to stop).
fn accept_ranks(
    listener: &TcpListener,
    size: usize,
    deadline: Instant,
    at: &str,
) -> Result<Vec<TcpStream>> {
    let mut by_rank: Vec<Option<TcpStream>> = (0..size).map(|_| None).collect();
    // polled, not blocking: a rank that never starts must not hold rank 0 forever
    listener.set_nonblocking(true)?;
    let missing = |by_rank: &[Option<TcpStream>]| -> Vec<usize> {
        (1..size).filter(|r| by_rank[*r].is_none()).collect()
    };
    while !missing(&by_rank).is_empty() {
        match listener.accept() {
            Ok((mut s, _)) => {
                s.set_nonblocking(false)?;
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(Duration::from_secs(60)))?;
                let mut r = [0u8; 8];
                s.read_exact(&mut r)
                    .with_context(|| format!("rendezvous at {at}: a peer sent no rank"))?;
                s.set_read_timeout(None)?;
                let r = u64::from_le_bytes(r) as usize;
                if r == 0 || r >= size || by_rank[r].is_some() {
                    bail!("rendezvous: a peer claimed rank {r} twice or out of range");
                }
                by_rank[r] = Some(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let why = if let Some(sig) = crate::stop::signalled() {
                    crate::stop::Reason::Signal(sig).describe()
                } else if Instant::now() >= deadline {
                    "timed out".to_string()
                } else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                bail!(
                    "{why} while rank 0 waited at {at}: rank(s) {:?} of WORLD_SIZE={size} did not join (did they start? do they reach MASTER_ADDR?)",
                    missing(&by_rank)
                );
            }
            Err(e) => return Err(e).with_context(|| format!("rank 0 accepting at {at}")),
        }
    }
    Ok(by_rank.into_iter().flatten().collect())
}

/// A stream to `addr`, retried until `deadline` while the other side starts.
fn connect_by(addr: &str, deadline: Instant) -> std::io::Result<TcpStream> {
    loop {
        match TcpStream::connect(addr) {
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            r => return r.and_then(|s| s.set_nodelay(true).map(|_| s)),
        }
    }
}

/// Another rank's side: a stream to rank 0 at `addr`, retried while rank 0 starts.
fn connect_to_rank0(addr: &str, rank: usize, deadline: Instant) -> Result<TcpStream> {
    let mut s = connect_by(addr, deadline)
        .map_err(|e| anyhow!("rank {rank} cannot reach rank 0 at {addr}: {e}"))?;
    s.write_all(&(rank as u64).to_le_bytes())?;
    Ok(s)
}

/// A listener on a free port of every interface (IPv6 and IPv4 where the host has both): the
/// other ranks reach it at `MASTER_ADDR`, whatever address that names on this host.
fn listen_anywhere() -> Result<TcpListener> {
    TcpListener::bind("[::]:0")
        .or_else(|_| TcpListener::bind("0.0.0.0:0"))
        .context("rank 0 cannot listen on a free port")
}

/// A client of PyTorch's c10d TCPStore (`torch/csrc/distributed/c10d/TCPStore.cpp`), the store
/// torchrun's agent serves: requests are a query byte then little-endian fields, strings and
/// values as a u64 length and the bytes.
struct Store {
    s: TcpStream,
    at: String,
}

impl Store {
    const VALIDATE: u8 = 0;
    const SET: u8 = 1;
    const GET: u8 = 3;
    const WAIT: u8 = 6;
    const MAGIC: u32 = 0x3C85_F7CE;
    const STOP_WAITING: u8 = 0;

    fn connect(at: &str, deadline: Instant) -> Result<Store> {
        let s = connect_by(at, deadline)
            .map_err(|e| anyhow!("cannot reach torchrun's store at {at}: {e}"))?;
        let mut store = Store { s, at: at.into() };
        let mut m = vec![Self::VALIDATE];
        m.extend(Self::MAGIC.to_le_bytes());
        store.send(&m)?;
        Ok(store)
    }

    fn send(&mut self, m: &[u8]) -> Result<()> {
        self.s
            .write_all(m)
            .with_context(|| format!("torchrun's store at {}", self.at))
    }

    fn field(m: &mut Vec<u8>, bytes: &[u8]) {
        m.extend((bytes.len() as u64).to_le_bytes());
        m.extend(bytes);
    }

    fn set(&mut self, key: &str, value: &[u8]) -> Result<()> {
        let mut m = vec![Self::SET];
        Self::field(&mut m, key.as_bytes());
        Self::field(&mut m, value);
        self.send(&m)
    }

    /// The value of `key`, once some rank has set it (until `deadline`).
    fn get(&mut self, key: &str, deadline: Instant) -> Result<Vec<u8>> {
        let at = self.at.clone();
        let what = || format!("`{key}` from torchrun's store at {at}");
        let mut m = vec![Self::WAIT];
        m.extend(1u64.to_le_bytes());
        Self::field(&mut m, key.as_bytes());
        self.send(&m)?;
        let left = deadline.saturating_duration_since(Instant::now());
        self.s
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
        let mut r = [0u8; 1];
        self.s.read_exact(&mut r).with_context(|| {
            format!(
                "waiting {}s for {} (has rank 0 started?)",
                left.as_secs(),
                what()
            )
        })?;
        if r[0] != Self::STOP_WAITING {
            bail!("{}: unexpected wait response {}", what(), r[0]);
        }
        let mut m = vec![Self::GET];
        Self::field(&mut m, key.as_bytes());
        self.send(&m)?;
        let mut len = [0u8; 8];
        self.s.read_exact(&mut len).with_context(what)?;
        let len = u64::from_le_bytes(len);
        if len > 1 << 20 {
            bail!("{}: a value of {len} bytes", what());
        }
        let mut v = vec![0u8; len as usize];
        self.s.read_exact(&mut v).with_context(what)?;
        Ok(v)
    }
}

fn send(s: &mut TcpStream, bytes: &[u8]) -> Result<()> {
    s.write_all(&(bytes.len() as u64).to_le_bytes())?;
    s.write_all(bytes)?;
    Ok(())
}

fn recv(s: &mut TcpStream) -> Result<Vec<u8>> {
    let mut len = [0u8; 8];
    s.read_exact(&mut len)?;
    let mut buf = vec![0u8; u64::from_le_bytes(len) as usize];
    s.read_exact(&mut buf)?;
    Ok(buf)
}

impl Tcp {
    /// Rank 0 listens (on `MASTER_ADDR:MASTER_PORT`, or under torchrun on a free port it
    /// publishes in the agent's store) and waits for the others (10 minutes at most); the others
    /// connect, retrying while rank 0 starts.
    pub fn connect(world: &World) -> Result<Tcp> {
        Self::connect_within(world, Duration::from_secs(600))
    }

    /// `connect`, waiting `wait` at most for the others.
    pub fn connect_within(world: &World, wait: Duration) -> Result<Tcp> {
        let deadline = Instant::now() + wait;
        let master = format!("{}:{}", world.master_addr, world.master_port);
        // under torchrun, rank 0's port goes through the agent's store, keyed by attempt
        let mut store = match world.agent_store {
            Some(attempt) => Some((
                Store::connect(&master, deadline)?,
                format!("olmo_train/attempt_{attempt}/rank0_port"),
            )),
            None => None,
        };
        let (peers, at) = if world.rank == 0 {
            let listener = match store {
                None => TcpListener::bind(&master).with_context(|| {
                    format!("rank 0 cannot listen on {master} (MASTER_ADDR/MASTER_PORT)")
                })?,
                Some(_) => listen_anywhere()?,
            };
            let port = listener.local_addr()?.port();
            if let Some((store, key)) = &mut store {
                store.set(key, port.to_string().as_bytes())?;
            }
            let at = format!("{}:{port}", world.master_addr);
            (accept_ranks(&listener, world.size, deadline, &at)?, at)
        } else {
            let at = match &mut store {
                None => master,
                Some((store, key)) => {
                    let port = store.get(key, deadline)?;
                    let port = std::str::from_utf8(&port)
                        .ok()
                        .and_then(|p| p.parse::<u16>().ok())
                        .with_context(|| {
                            format!("torchrun's store at {master}: `{key}` is not a port")
                        })?;
                    format!("{}:{port}", world.master_addr)
                }
            };
            (vec![connect_to_rank0(&at, world.rank, deadline)?], at)
        };
        Ok(Tcp {
            rank: world.rank,
            size: world.size,
            peers,
            at,
        })
    }

    /// Where the ranks met: rank 0's address and port, and whether torchrun's store told it.
    pub fn meeting_place(&self, world: &World) -> String {
        match world.agent_store {
            None => self.at.clone(),
            Some(_) => format!(
                "{} (its port from torchrun's store at {}:{})",
                self.at, world.master_addr, world.master_port
            ),
        }
    }

    /// Sums `buf` over all ranks, adding in rank order on rank 0, and gives every rank the sum.
    pub fn all_reduce_f32(&mut self, buf: &mut [f32]) -> Result<()> {
        let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        if self.rank == 0 {
            for p in &mut self.peers {
                let got = recv(p)?;
                if got.len() != buf.len() * 4 {
                    bail!(
                        "all-reduce: a peer sent {} bytes, expected {}",
                        got.len(),
                        buf.len() * 4
                    );
                }
                for (x, c) in buf.iter_mut().zip(got.chunks_exact(4)) {
                    *x += f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            let out = bytes(buf);
            for p in &mut self.peers {
                send(p, &out)?;
            }
        } else {
            send(&mut self.peers[0], &bytes(buf))?;
            let got = recv(&mut self.peers[0])?;
            for (x, c) in buf.iter_mut().zip(got.chunks_exact(4)) {
                *x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        Ok(())
    }

    /// Sums a few f64 scalars over all ranks.
    pub fn all_reduce_f64(&mut self, v: &mut [f64]) -> Result<()> {
        let enc = |v: &[f64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let dec = |b: &[u8]| -> Vec<f64> {
            b.chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect()
        };
        if self.rank == 0 {
            for p in &mut self.peers {
                for (x, y) in v.iter_mut().zip(dec(&recv(p)?)) {
                    *x += y;
                }
            }
            let out = enc(v);
            for p in &mut self.peers {
                send(p, &out)?;
            }
        } else {
            send(&mut self.peers[0], &enc(v))?;
            v.copy_from_slice(&dec(&recv(&mut self.peers[0])?));
        }
        Ok(())
    }

    /// Rank 0's bytes to every rank.
    pub fn broadcast(&mut self, bytes: &mut Vec<u8>) -> Result<()> {
        if self.rank == 0 {
            for p in &mut self.peers {
                send(p, bytes)?;
            }
        } else {
            *bytes = recv(&mut self.peers[0])?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn world_from_torchrun_and_slurm_variables() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(a, _)| *a == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(World::from_vars(vars(&[])).unwrap(), World::single());
        let w = World::from_vars(vars(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "1234"),
        ]))
        .unwrap();
        assert_eq!(
            (w.rank, w.size, w.local_rank, w.master_port, w.agent_store),
            (3, 8, 1, 1234, None)
        );
        // a launcher that does not share its store with the workers
        let w = World::from_vars(vars(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("TORCHELASTIC_USE_AGENT_STORE", "False"),
        ]))
        .unwrap();
        assert_eq!(w.agent_store, None);
        let w = World::from_vars(vars(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_LOCALID", "1"),
            ("MASTER_ADDR", "n1"),
        ]))
        .unwrap();
        assert_eq!((w.rank, w.size, w.local_rank), (5, 16, 1));
        assert!(World::from_vars(vars(&[("RANK", "8"), ("WORLD_SIZE", "8")])).is_err());
        assert!(World::from_vars(vars(&[("RANK", "0")])).is_err());
    }

    /// Three ranks' all-reduces and broadcast, each rank's world from `world(rank)`.
    fn three_ranks_reduce(world: impl Fn(usize) -> World + Send + Sync + 'static) {
        let world = std::sync::Arc::new(world);
        let handles: Vec<_> = (0..3)
            .map(|rank| {
                let world = world.clone();
                std::thread::spawn(move || {
                    let mut t = Tcp::connect(&world(rank)).unwrap();
                    let mut v = vec![rank as f32, 1.0, 0.5 * rank as f32];
                    t.all_reduce_f32(&mut v).unwrap();
                    let mut s = [rank as f64 + 0.25];
                    t.all_reduce_f64(&mut s).unwrap();
                    let mut b = if rank == 0 {
                        b"id".to_vec()
                    } else {
                        Vec::new()
                    };
                    t.broadcast(&mut b).unwrap();
                    (v, s[0], b)
                })
            })
            .collect();
        for h in handles {
            let (v, s, b) = h.join().unwrap();
            assert_eq!(v, vec![3.0, 3.0, 1.5]);
            assert_eq!(s, 3.75);
            assert_eq!(b, b"id");
        }
    }

    /// A local port that was free a moment ago.
    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// Rank `rank` of 3 on this host, meeting at a port that was free a moment ago.
    fn three_local_ranks() -> impl Fn(usize) -> World + Send + Sync + Copy + 'static {
        let port = free_port();
        move |rank| World {
            rank,
            size: 3,
            local_rank: rank,
            master_addr: "127.0.0.1".into(),
            master_port: port,
            agent_store: None,
        }
    }

    #[test]
    fn tcp_all_reduce_sums_in_rank_order_on_every_rank() {
        three_ranks_reduce(three_local_ranks());
    }

    /// A TCPStore server as PyTorch's (`TCPStoreBackend`) answers the requests the client
    /// sends: VALIDATE (checked), SET, WAIT (answered once every key is set) and GET. Serves on
    /// a free local port, which it returns, holding `seed`'s keys from the start.
    fn fake_torch_store(seed: &[(&str, &str)]) -> u16 {
        use std::collections::HashMap;
        use std::sync::{Arc, Condvar, Mutex};
        type Keys = Arc<(Mutex<HashMap<Vec<u8>, Vec<u8>>>, Condvar)>;
        let keys: Keys = Arc::default();
        for (k, v) in seed {
            keys.0
                .lock()
                .unwrap()
                .insert(k.as_bytes().into(), v.as_bytes().into());
        }
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        fn u64_of(s: &mut TcpStream) -> Option<u64> {
            let mut b = [0u8; 8];
            s.read_exact(&mut b).ok()?;
            Some(u64::from_le_bytes(b))
        }
        fn bytes_of(s: &mut TcpStream) -> Option<Vec<u8>> {
            let n = u64_of(s)?;
            let mut v = vec![0u8; n as usize];
            s.read_exact(&mut v).ok()?;
            Some(v)
        }
        fn serve(mut s: TcpStream, keys: Keys) -> Option<()> {
            let mut validated = false;
            loop {
                let mut q = [0u8; 1];
                s.read_exact(&mut q).ok()?;
                assert!(validated || q[0] == 0, "a request before VALIDATE");
                match q[0] {
                    0 => {
                        let mut m = [0u8; 4];
                        s.read_exact(&mut m).ok()?;
                        assert_eq!(u32::from_le_bytes(m), 0x3C85_F7CE);
                        validated = true;
                    }
                    1 => {
                        let (k, v) = (bytes_of(&mut s)?, bytes_of(&mut s)?);
                        keys.0.lock().unwrap().insert(k, v);
                        keys.1.notify_all();
                    }
                    3 => {
                        let k = bytes_of(&mut s)?;
                        let v = keys.0.lock().unwrap()[&k].clone();
                        s.write_all(&(v.len() as u64).to_le_bytes()).ok()?;
                        s.write_all(&v).ok()?;
                    }
                    6 => {
                        let n = u64_of(&mut s)?;
                        let want: Vec<Vec<u8>> =
                            (0..n).map(|_| bytes_of(&mut s)).collect::<Option<_>>()?;
                        let mut m = keys.0.lock().unwrap();
                        while !want.iter().all(|k| m.contains_key(k)) {
                            m = keys.1.wait(m).unwrap();
                        }
                        s.write_all(&[0]).ok()?;
                    }
                    q => panic!("query {q} not expected"),
                }
            }
        }
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let keys = keys.clone();
                std::thread::spawn(move || serve(s.unwrap(), keys));
            }
        });
        port
    }

    #[test]
    fn under_torchrun_ranks_meet_through_the_agents_store() {
        let closed = free_port();
        // the store holds MASTER_PORT (rank 0 could not listen there), and a port from an
        // earlier attempt of the workers that is no longer anyone's
        let port = fake_torch_store(&[("olmo_train/attempt_0/rank0_port", &closed.to_string())]);
        let vars = |k: &str| {
            let v = match k {
                "RANK" => "1",
                "WORLD_SIZE" => "3",
                "MASTER_PORT" => return Some(port.to_string()),
                "TORCHELASTIC_USE_AGENT_STORE" => "True",
                "TORCHELASTIC_RESTART_COUNT" => "1",
                _ => return None,
            };
            Some(v.to_string())
        };
        let w = World::from_vars(vars).unwrap();
        assert_eq!((w.rank, w.agent_store, w.master_port), (1, Some(1), port));
        three_ranks_reduce(move |rank| World {
            rank,
            local_rank: rank,
            ..w.clone()
        });
    }

    #[test]
    fn rank_0_names_the_ranks_that_never_joined() {
        let world = three_local_ranks();
        let rank0 = std::thread::spawn(move || {
            Tcp::connect_within(&world(0), Duration::from_secs(2)).map(drop)
        });
        // rank 1 joins (it holds its stream until rank 0 gives up); rank 2 never starts
        let rank1 =
            std::thread::spawn(move || Tcp::connect_within(&world(1), Duration::from_secs(5)));
        let err = format!("{:#}", rank0.join().unwrap().unwrap_err());
        assert!(err.contains("timed out while rank 0 waited"), "{err}");
        assert!(
            err.contains("rank(s) [2] of WORLD_SIZE=3 did not join"),
            "{err}"
        );
        assert!(rank1.join().unwrap().is_ok());
    }
}
