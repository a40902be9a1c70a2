//! Talking to the local daemon over its unix socket: [`Client`] for any
//! request, [`VolumeClient`] for block I/O on one attached volume.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Mutex;

use crate::error::{Error, Result};
use crate::io::VolumeIo;
use crate::proto::{Progress, Request, Response};
use crate::transport::Link;
use crate::MAX_IO;

pub struct Client {
    link: Link,
}

impl Client {
    pub fn connect(socket: &Path) -> Result<Client> {
        let s = UnixStream::connect(socket).map_err(|e| {
            Error::Unavailable(format!(
                "cannot reach the kiln-store daemon at {}: {e}",
                socket.display()
            ))
        })?;
        Ok(Client {
            link: Link::new(Box::new(s)),
        })
    }

    pub fn call(&mut self, req: &Request) -> Result<Response> {
        self.link.call(req)
    }

    pub fn call_with_progress(
        &mut self,
        req: &Request,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Response> {
        self.link.call_with_progress(req, progress)
    }
}

/// Block I/O on a volume attached to the local daemon.
pub struct VolumeClient {
    client: Mutex<Client>,
    name: String,
}

impl VolumeClient {
    pub fn open(socket: &Path, name: &str) -> Result<VolumeClient> {
        crate::validate_name(name)?;
        Ok(VolumeClient {
            client: Mutex::new(Client::connect(socket)?),
            name: name.to_string(),
        })
    }

    fn call(&self, req: &Request) -> Result<Response> {
        self.client.lock().expect(crate::POISONED).call(req)
    }
}

impl VolumeIo for VolumeClient {
    fn size(&self) -> Result<u64> {
        match self.call(&Request::VolShow {
            name: self.name.clone(),
        })? {
            Response::Status(s) => Ok(s.size),
            _ => Err(Error::Protocol("unexpected reply".into())),
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let n = (buf.len() - done).min(MAX_IO as usize);
            match self.call(&Request::VolRead {
                name: self.name.clone(),
                offset: offset + done as u64,
                len: n as u64,
            })? {
                Response::Read(r) if r.data.len() == n => {
                    buf[done..done + n].copy_from_slice(&r.data)
                }
                _ => return Err(Error::Protocol("unexpected reply to read".into())),
            }
            done += n;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        for (i, chunk) in buf.chunks(MAX_IO as usize).enumerate() {
            self.call(&Request::VolWrite {
                name: self.name.clone(),
                offset: offset + (i as u64) * MAX_IO,
                data: chunk.to_vec(),
            })?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.call(&Request::VolFlush {
            name: self.name.clone(),
        })
        .map(|_| ())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.call(&Request::VolDiscard {
            name: self.name.clone(),
            offset,
            len,
        })
        .map(|_| ())
    }
}
