//! Opening an RS-485 serial port as a `tokio_serial::SerialStream`.
//!
//! The port is configured with the classic termios calls (`tcsetattr` with a
//! standard `Bxxxx` speed) and then handed to tokio-serial, instead of letting
//! serialport configure it. serialport uses the Linux `TCGETS2`/`TCSETS2` ioctls,
//! which qemu user-mode emulation (how the ARM builds are tested) and some seccomp
//! sandboxes do not support; classic termios works everywhere and covers every
//! Modbus RTU speed. (rustix's `tcsetattr` uses `TCSETS2` on Linux as well, so the
//! calls stay on libc.)

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::FromRawFd;
use std::path::Path;

use tokio_serial::SerialStream;

use crate::acquire::config::Parity;

/// Line settings of a serial bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineSettings {
    pub baud_rate: u32,
    pub parity: Parity,
    pub data_bits: u8,
    pub stop_bits: u8,
}

/// Baud rates a serial bus may use: the standard termios speeds.
pub const STANDARD_BAUD_RATES: &[u32] = &[
    300, 600, 1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200, 230400,
];

fn speed_constant(baud: u32) -> Option<libc::speed_t> {
    Some(match baud {
        300 => libc::B300,
        600 => libc::B600,
        1200 => libc::B1200,
        2400 => libc::B2400,
        4800 => libc::B4800,
        9600 => libc::B9600,
        19200 => libc::B19200,
        38400 => libc::B38400,
        57600 => libc::B57600,
        115200 => libc::B115200,
        230400 => libc::B230400,
        _ => return None,
    })
}

/// Closes the descriptor unless ownership was handed on.
struct FdGuard(Option<i32>);

impl Drop for FdGuard {
    fn drop(&mut self) {
        if let Some(fd) = self.0.take() {
            // SAFETY: we opened this descriptor and nobody else owns it.
            unsafe { libc::close(fd) };
        }
    }
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Opens `path` raw (no echo, no line discipline, no flow control) with the given
/// line settings, discards anything already queued on it, and returns it as a
/// non-blocking tokio-serial stream.
pub fn open(path: &Path, line: LineSettings) -> io::Result<SerialStream> {
    let speed = speed_constant(line.baud_rate).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} baud is not a standard serial speed", line.baud_rate),
        )
    })?;
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "port path contains NUL"))?;
    // SAFETY: a valid C string and plain flags.
    let fd = unsafe {
        libc::open(
            c_path.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    check(fd)?;
    let mut guard = FdGuard(Some(fd));

    // SAFETY: termios is plain data; tcgetattr fills it for a valid descriptor.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    check(unsafe { libc::tcgetattr(fd, &mut t) })?;
    // SAFETY: cfmakeraw only edits the struct it is given.
    unsafe { libc::cfmakeraw(&mut t) };
    t.c_cflag |= libc::CLOCAL | libc::CREAD;
    t.c_cflag &= !(libc::CSIZE | libc::PARENB | libc::PARODD | libc::CSTOPB | libc::CRTSCTS);
    t.c_cflag |= match line.data_bits {
        5 => libc::CS5,
        6 => libc::CS6,
        7 => libc::CS7,
        _ => libc::CS8,
    };
    match line.parity {
        Parity::None => {}
        Parity::Even => t.c_cflag |= libc::PARENB,
        Parity::Odd => t.c_cflag |= libc::PARENB | libc::PARODD,
    }
    if line.stop_bits == 2 {
        t.c_cflag |= libc::CSTOPB;
    }
    t.c_iflag &= !(libc::IXON | libc::IXOFF | libc::IXANY);
    t.c_cc[libc::VMIN] = 1;
    t.c_cc[libc::VTIME] = 0;
    // SAFETY: valid struct and descriptor.
    check(unsafe { libc::cfsetispeed(&mut t, speed) })?;
    check(unsafe { libc::cfsetospeed(&mut t, speed) })?;
    check(unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) })?;
    // Bytes queued before we opened belong to exchanges we were not part of.
    check(unsafe { libc::tcflush(fd, libc::TCIOFLUSH) })?;

    let fd = guard.0.take().unwrap_or(fd);
    // SAFETY: `fd` is an open tty descriptor that we own; TTYPort takes ownership.
    let port = unsafe { serialport::TTYPort::from_raw_fd(fd) };
    SerialStream::try_from(port).map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn pty_name(stream: &SerialStream) -> std::path::PathBuf {
        use std::os::unix::io::AsRawFd;
        let mut buf = [0u8; 128];
        // SAFETY: a valid descriptor and a buffer of the given length.
        let rc = unsafe { libc::ttyname_r(stream.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        assert_eq!(rc, 0, "ttyname of the pty slave");
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        std::path::PathBuf::from(String::from_utf8_lossy(&buf[..end]).into_owned())
    }

    #[tokio::test]
    async fn opens_a_pty_by_path_and_moves_bytes_both_ways() {
        let (mut master, slave) = SerialStream::pair().expect("pty pair");
        let path = pty_name(&slave);
        let line = LineSettings {
            baud_rate: 19200,
            parity: Parity::Even,
            data_bits: 8,
            stop_bits: 1,
        };
        let mut port = open(&path, line).expect("open by path");
        port.write_all(&[0x01, 0x04, 0xff]).await.expect("write");
        let mut got = [0u8; 3];
        master
            .read_exact(&mut got)
            .await
            .expect("read at the master");
        assert_eq!(got, [0x01, 0x04, 0xff], "raw mode: bytes pass unchanged");
        master
            .write_all(&[0x0d, 0x0a, 0x11])
            .await
            .expect("write back");
        let mut back = [0u8; 3];
        port.read_exact(&mut back).await.expect("read at the port");
        assert_eq!(back, [0x0d, 0x0a, 0x11], "no CR/LF or XON translation");
    }

    #[test]
    fn a_non_standard_speed_is_refused_with_the_rate_named() {
        let line = LineSettings {
            baud_rate: 12345,
            parity: Parity::None,
            data_bits: 8,
            stop_bits: 1,
        };
        let e = open(Path::new("/dev/null"), line).expect_err("refused");
        assert!(e.to_string().contains("12345"), "{e}");
    }
}
