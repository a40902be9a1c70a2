//! The 16550 UART on COM1, built on vm-superio's `Serial`.
//!
//! Output goes to any writer (stdout or a file). Input is pushed in by the
//! VMM's event loop; when the guest has drained the receive FIFO, the
//! `input_ready` eventfd fires so the loop can resume reading its source.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use vm_superio::serial::{SerialEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::bus::BusDevice;

/// Raises an interrupt by writing to an eventfd registered as a KVM irqfd.
pub struct EventFdTrigger(Arc<EventFd>);

impl EventFdTrigger {
    pub fn new(evt: EventFd) -> Self {
        Self(Arc::new(evt))
    }
}

impl Trigger for EventFdTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Signals the event loop when the receive FIFO has room again.
pub struct InputReady(Arc<EventFd>);

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

/// The device's output, shared with its UART so that a UART rebuilt from a
/// saved state writes to it too.
#[derive(Clone)]
pub struct SharedOutput(Arc<Mutex<Box<dyn Write + Send>>>);

impl Write for SharedOutput {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).write(b)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).flush()
    }
}

type Uart = Serial<EventFdTrigger, InputReady, SharedOutput>;

pub struct SerialDevice {
    uart: Uart,
    output_failed: bool,
    /// The UART's interrupt and input-room eventfds, kept to rebuild it
    /// from a saved state.
    irq: Arc<EventFd>,
    ready: Arc<EventFd>,
    out: SharedOutput,
}

/// The UART's registers and receive FIFO (vm-superio's `SerialState`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    /// Bytes the guest has not read yet.
    pub in_buffer: Vec<u8>,
}

/// A saved UART state the device cannot take.
#[derive(Debug, thiserror::Error)]
pub enum SerialRestoreError {
    #[error("the saved serial port holds {0} unread bytes, more than its FIFO")]
    FifoOverflow(usize),
    #[error("cannot raise the restored serial port's interrupt: {0}")]
    Interrupt(#[source] io::Error),
}

impl SerialDevice {
    /// `irq` is the eventfd registered as the port's irqfd; output goes to `out`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> io::Result<Self> {
        let irq = Arc::new(irq);
        let ready = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let out = SharedOutput(Arc::new(Mutex::new(out)));
        Ok(Self {
            uart: Serial::with_events(
                EventFdTrigger(irq.clone()),
                InputReady(ready.clone()),
                out.clone(),
            ),
            output_failed: false,
            irq,
            ready,
            out,
        })
    }

    /// The UART's registers and unread input, for a snapshot.
    pub fn snapshot(&self) -> SerialSnapshot {
        let s = self.uart.state();
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Takes over a saved UART state, keeping this device's output, input
    /// wiring and interrupt; raises the interrupt if the state has one
    /// pending. Creates no file descriptor.
    pub fn restore(&mut self, saved: &SerialSnapshot) -> Result<(), SerialRestoreError> {
        let state = SerialState {
            baud_divisor_low: saved.baud_divisor_low,
            baud_divisor_high: saved.baud_divisor_high,
            interrupt_enable: saved.interrupt_enable,
            interrupt_identification: saved.interrupt_identification,
            line_control: saved.line_control,
            line_status: saved.line_status,
            modem_control: saved.modem_control,
            modem_status: saved.modem_status,
            scratch: saved.scratch,
            in_buffer: saved.in_buffer.clone(),
        };
        let trigger = EventFdTrigger(self.irq.clone());
        let ready = InputReady(self.ready.clone());
        match Serial::from_state(&state, trigger, ready, self.out.clone()) {
            Ok(uart) => {
                self.uart = uart;
                Ok(())
            }
            Err(vm_superio::serial::Error::Trigger(e)) => Err(SerialRestoreError::Interrupt(e)),
            Err(_) => Err(SerialRestoreError::FifoOverflow(saved.in_buffer.len())),
        }
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

    /// A UART with settings and unread input is saved, and restored into a
    /// new device that keeps its own output and interrupt: the guest reads
    /// its input on, with the interrupt raised again, and writes on.
    #[test]
    fn state_round_trips_into_a_new_device() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq.try_clone().unwrap(), Box::new(io::sink())).unwrap();
        dev.write(3, &[0x80]); // DLAB
        dev.write(0, &[0x0c]); // 9600 baud
        dev.write(3, &[0x03]); // 8N1
        dev.write(7, &[0x5a]); // scratch
        dev.write(1, &[0x01]); // receive interrupt
        assert_eq!(dev.push_input(b"xyz"), 3);
        let saved = dev.snapshot();
        assert_eq!(saved.in_buffer, b"xyz");
        assert_eq!(saved.baud_divisor_low, 0x0c);
        let json = serde_json::to_string(&saved).unwrap();
        let back: SerialSnapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(back, saved);

        let irq2 = EventFd::new(EFD_NONBLOCK).unwrap();
        let sink = Sink::default();
        let mut new = SerialDevice::new(irq2.try_clone().unwrap(), Box::new(sink.clone())).unwrap();
        new.restore(&back).unwrap();
        assert_eq!(new.snapshot(), saved);
        assert!(
            irq2.read().unwrap() >= 1,
            "pending input raises the interrupt"
        );
        assert_eq!(new.input_room(), 64 - 3);
        let mut b = [0u8];
        new.read(7, &mut b);
        assert_eq!(b[0], 0x5a);
        new.read(0, &mut b);
        assert_eq!(b[0], b'x');
        new.read(0, &mut b);
        assert_eq!(b[0], b'y');
        new.read(0, &mut b);
        assert_eq!(b[0], b'z');
        assert!(new.input_ready_eventfd().read().unwrap() >= 1);
        new.write(0, b"!");
        assert_eq!(&*sink.0.lock().unwrap(), b"!");

        // More unread input than a FIFO holds is refused, the device kept.
        let mut bad = saved.clone();
        bad.in_buffer = vec![0; 65];
        assert!(matches!(
            new.restore(&bad),
            Err(SerialRestoreError::FifoOverflow(65))
        ));
        new.write(0, b"?");
        assert_eq!(&*sink.0.lock().unwrap(), b"!?");
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
