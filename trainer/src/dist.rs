//! Data parallelism across processes, launched the way torchrun or Slurm launch them: one
//! process per device with `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`
//! (or `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`). Each rank trains on its slice
//! `batch[rank::world]` of the same global order; gradients are summed across ranks before
//! clipping, so every rank applies the same update and the weights stay identical.
//!
//! The transport here is a TCP star through rank 0: it carries the CPU engine's all-reduce (in
//! rank order, so the sums are deterministic), the loss scalars, and NCCL's unique id for the
//! CUDA engine, which then all-reduces gradients on the GPUs.

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
}

impl World {
    pub fn single() -> World {
        World {
            rank: 0,
            size: 1,
            local_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: 29500,
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
        Ok(World {
            rank,
            size,
            local_rank: local,
            master_addr,
            master_port,
        })
    }
}

/// The TCP star: rank 0 holds a stream to every other rank (in rank order); the others hold one
/// stream to rank 0.
pub struct Tcp {
    pub rank: usize,
    pub size: usize,
    peers: Vec<TcpStream>,
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
    /// Rank 0 listens on `MASTER_ADDR:MASTER_PORT` and waits for the others (10 minutes at
    /// most); the others connect, retrying while rank 0 starts.
    pub fn connect(world: &World) -> Result<Tcp> {
        let addr = format!("{}:{}", world.master_addr, world.master_port);
        let deadline = Instant::now() + Duration::from_secs(600);
        let mut peers = Vec::new();
        if world.rank == 0 {
            let listener = TcpListener::bind(&addr).with_context(|| {
                format!("rank 0 cannot listen on {addr} (MASTER_ADDR/MASTER_PORT)")
            })?;
            let mut by_rank: Vec<Option<TcpStream>> = (0..world.size).map(|_| None).collect();
            for _ in 1..world.size {
                let (mut s, _) = listener.accept()?;
                s.set_nodelay(true)?;
                let mut r = [0u8; 8];
                s.read_exact(&mut r)?;
                let r = u64::from_le_bytes(r) as usize;
                if r == 0 || r >= world.size || by_rank[r].is_some() {
                    bail!("rendezvous: a peer claimed rank {r} twice or out of range");
                }
                by_rank[r] = Some(s);
            }
            peers = by_rank.into_iter().flatten().collect();
        } else {
            let s = loop {
                match TcpStream::connect(&addr) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() < deadline => {
                        let _ = e;
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    Err(e) => {
                        return Err(anyhow!(
                            "rank {} cannot reach rank 0 at {addr}: {e}",
                            world.rank
                        ))
                    }
                }
            };
            s.set_nodelay(true)?;
            let mut s = s;
            s.write_all(&(world.rank as u64).to_le_bytes())?;
            peers.push(s);
        }
        Ok(Tcp {
            rank: world.rank,
            size: world.size,
            peers,
        })
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
            (w.rank, w.size, w.local_rank, w.master_port),
            (3, 8, 1, 1234)
        );
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

    #[test]
    fn tcp_all_reduce_sums_in_rank_order_on_every_rank() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let handles: Vec<_> = (0..3)
            .map(|rank| {
                std::thread::spawn(move || {
                    let w = World {
                        rank,
                        size: 3,
                        local_rank: rank,
                        master_addr: "127.0.0.1".into(),
                        master_port: port,
                    };
                    let mut t = Tcp::connect(&w).unwrap();
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
}
