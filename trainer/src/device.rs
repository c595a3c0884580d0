//! Where training runs: `--device auto|cpu|cuda[:N]` (or the config's `device:`). `auto` takes
//! CUDA when a driver, the CUDA libraries the engine loads at run time and a GPU are all
//! present, and the CPU otherwise, saying why; an explicit `cuda` that cannot work is an error
//! naming the missing library and where it was looked for. Nothing here panics: cudarc would
//! panic on a missing library, so presence is checked before any CUDA call.

use anyhow::{bail, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
    /// The CUDA engine on its host emulator: slow, for testing the engine without a GPU.
    CudaEmulator,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Auto,
    Cpu,
    Cuda(usize),
    CudaEmulator,
}

impl Request {
    pub fn parse(s: &str) -> Result<Request> {
        Ok(match s.trim() {
            "auto" => Request::Auto,
            "cpu" => Request::Cpu,
            "cuda" | "gpu" => Request::Cuda(0),
            "cuda-emulator" => Request::CudaEmulator,
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Request::Cuda(n),
                _ => bail!("device `{other}`: expected auto, cpu, cuda or cuda:N"),
            },
        })
    }
}

impl Request {
    /// With one process per GPU, `auto` (when CUDA is usable) and `cuda` mean this process's
    /// GPU, `LOCAL_RANK`; an explicit `cuda:N` with N > 0 is kept.
    pub fn on_local_rank(self, local_rank: usize) -> Request {
        match self {
            Request::Auto if cuda_unavailable().is_err() => Request::Auto,
            Request::Auto | Request::Cuda(0) => Request::Cuda(local_rank),
            r => r,
        }
    }
}

/// The shared libraries the CUDA engine loads, each with cudarc's presence check.
fn libraries() -> [(&'static str, bool); 4] {
    // Safety: these only try to dlopen candidate names.
    unsafe {
        [
            ("cuda", cudarc::driver::sys::is_culib_present()),
            ("nvrtc", cudarc::nvrtc::sys::is_culib_present()),
            ("cublas", cudarc::cublas::sys::is_culib_present()),
            ("cublasLt", cudarc::cublaslt::sys::is_culib_present()),
        ]
    }
}

/// Why CUDA cannot be used here, or `None` when it can (with the GPU count).
pub fn cuda_unavailable() -> std::result::Result<usize, String> {
    for (name, present) in libraries() {
        if !present {
            let tried = cudarc::get_lib_name_candidates(name);
            let path = std::env::var("LD_LIBRARY_PATH").unwrap_or_default();
            return Err(format!(
                "the {name} library could not be loaded (tried {} and {} more names on LD_LIBRARY_PATH=`{path}` and the system library path)",
                tried.iter().take(2).cloned().collect::<Vec<_>>().join(", "),
                tried.len().saturating_sub(2)
            ));
        }
    }
    match cudarc::driver::CudaContext::device_count() {
        Ok(n) if n > 0 => Ok(n as usize),
        Ok(_) => Err("the CUDA driver reports no GPU".into()),
        Err(e) => Err(format!("the CUDA driver failed to initialise: {e}")),
    }
}

/// Resolves a request to a device, with a line saying what was chosen and why.
pub fn resolve(req: Request) -> Result<(Device, String)> {
    match req {
        Request::Cpu => Ok((Device::Cpu, "cpu (requested)".into())),
        Request::CudaEmulator => Ok((
            Device::CudaEmulator,
            "the CUDA engine on its host emulator (testing only: slow)".into(),
        )),
        Request::Auto => match cuda_unavailable() {
            Ok(_) => Ok((Device::Cuda(0), "cuda:0 (auto: a GPU is present)".into())),
            Err(why) => Ok((Device::Cpu, format!("cpu (auto: no CUDA: {why})"))),
        },
        Request::Cuda(n) => match cuda_unavailable() {
            Ok(count) if n < count => Ok((Device::Cuda(n), format!("cuda:{n}"))),
            Ok(count) => bail!("device cuda:{n}: only {count} GPU(s) present"),
            Err(why) => bail!("device cuda:{n} requested, but {why}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse() {
        assert_eq!(Request::parse("auto").unwrap(), Request::Auto);
        assert_eq!(Request::parse("cuda").unwrap(), Request::Cuda(0));
        assert_eq!(Request::parse("cuda:3").unwrap(), Request::Cuda(3));
        assert!(Request::parse("tpu").is_err());
    }

    #[test]
    fn auto_never_fails_and_cpu_is_always_cpu() {
        let (d, why) = resolve(Request::Auto).unwrap();
        assert!(matches!(d, Device::Cpu | Device::Cuda(0)), "{why}");
        assert_eq!(resolve(Request::Cpu).unwrap().0, Device::Cpu);
        // without a GPU (CI), cuda is an error that names what is missing
        if cuda_unavailable().is_err() {
            let err = resolve(Request::Cuda(0)).unwrap_err().to_string();
            assert!(
                err.contains("could not be loaded")
                    || err.contains("no GPU")
                    || err.contains("failed"),
                "{err}"
            );
            assert_eq!(d, Device::Cpu);
        }
    }
}
