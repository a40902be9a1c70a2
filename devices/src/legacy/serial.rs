//! The 16550 UART on COM1, built on vm-superio's `Serial`.
//!
//! Output goes to any writer (stdout or a file). Input is pushed in by the
//! VMM's event loop; when the guest has drained the receive FIFO, the
//! `input_ready` eventfd fires so the loop can resume reading its source.

use std::io::{self, Write};

use vm_superio::serial::SerialEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::bus::BusDevice;

/// Raises an interrupt by writing to an eventfd registered as a KVM irqfd.
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    pub fn new(evt: EventFd) -> Self {
        Self(evt)
    }
}

impl Trigger for EventFdTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Signals the event loop when the receive FIFO has room again.
pub struct InputReady(EventFd);

impl SerialEvents for InputReady {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        if let Err(e) = self.0.write(1) {
            tracing::warn!("serial: cannot signal input room: {e}");
        }
    }
}

type Uart = Serial<EventFdTrigger, InputReady, Box<dyn Write + Send>>;

pub struct SerialDevice {
    uart: Uart,
    output_failed: bool,
}

impl SerialDevice {
    /// `irq` is the eventfd registered as the port's irqfd; output goes to `out`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> io::Result<Self> {
        let ready = EventFd::new(EFD_NONBLOCK)?;
        Ok(Self {
            uart: Serial::with_events(EventFdTrigger::new(irq), InputReady(ready), out),
            output_failed: false,
        })
    }

    /// The eventfd that fires when the guest has emptied the receive FIFO.
    pub fn input_ready_eventfd(&self) -> &EventFd {
        &self.uart.events().0
    }

    /// Room left in the receive FIFO.
    pub fn input_room(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Queues bytes for the guest to read; returns how many were taken.
    pub fn push_input(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.uart.fifo_capacity());
        if n == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(&bytes[..n]) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("serial: dropping input: {e:?}");
                0
            }
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The UART's registers are byte-wide; wider accesses read as ones.
        match (data.len(), u8::try_from(offset)) {
            (1, Ok(off)) => data[0] = self.uart.read(off),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (1, Ok(off)) = (data.len(), u8::try_from(offset)) else {
            return;
        };
        if let Err(e) = self.uart.write(off, data[0]) {
            // A closed stdout must not stop the guest; say it once.
            if !self.output_failed {
                self.output_failed = true;
                tracing::warn!("serial: output failed, further output is lost: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmits_bytes_and_raises_receive_interrupts() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let sink = Sink::default();
        let mut dev = SerialDevice::new(irq.try_clone().unwrap(), Box::new(sink.clone())).unwrap();
        for b in b"hi" {
            dev.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi");

        // Enable the "received data available" interrupt, then feed input.
        dev.write(1, &[0x01]);
        assert_eq!(dev.push_input(b"ok"), 2);
        assert!(irq.read().unwrap() >= 1);
        let mut b = [0u8];
        dev.read(0, &mut b);
        assert_eq!(b[0], b'o');
        dev.read(0, &mut b);
        assert_eq!(b[0], b'k');
        assert!(dev.input_ready_eventfd().read().unwrap() >= 1);
    }

    #[test]
    fn odd_widths_and_offsets_are_harmless() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq, Box::new(io::sink())).unwrap();
        let mut wide = [0u8; 4];
        dev.read(0, &mut wide);
        assert_eq!(wide, [0xff; 4]);
        dev.write(1 << 40, &[1]);
        dev.write(0, &[1, 2]);
    }
}
