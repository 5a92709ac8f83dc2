//! FUSE over io_uring (Linux 6.14+, FUSE protocol 7.42).
//!
//! When the filesystem asks for `FUSE_OVER_IO_URING` in `init` and the kernel grants it (the
//! module parameter `/sys/module/fuse/parameters/enable_uring` is on), one thread per possible
//! CPU registers a few ring entries on that CPU's kernel queue and serves the requests the kernel
//! puts in them. The kernel queues a request on the queue of the CPU that issued it, and the
//! thread serving that queue is pinned to that CPU, so a request and its reply never cross CPUs.
//! `/dev/fuse` still carries FORGET, INTERRUPT and notifications, served by the usual threads.
//!
//! A ring entry holds a 288-byte header (`struct fuse_uring_req_header`: the in/out header, the
//! operation's own header, and the entry's commit id and payload size) and a payload buffer. The
//! request is put back together in the `/dev/fuse` layout and dispatched as usual; its reply is
//! split again into the out header and payload and handed back with `COMMIT_AND_FETCH`, which
//! also waits for the next request. Replies may come from any thread: those not made on the
//! queue's own thread are queued and the thread woken through an eventfd.
//!
//! If registering fails, the kernel never marks the ring ready and every request keeps coming
//! through `/dev/fuse`.

use std::io;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle, ThreadId};

use io_uring::{IoUring, cqueue, opcode, squeue, types};
use log::{debug, warn};

use crate::Filesystem;
use crate::channel::ChannelSender;
use crate::ll;
use crate::request::{RequestSender, RequestWithSender};
use crate::session::SessionEventLoop;

/// `enum fuse_uring_cmd`.
const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;
/// Ring entries per queue: requests one CPU can have in flight at once.
const ENTRIES_PER_QUEUE: usize = 8;
/// The `user_data` of the eventfd read that wakes a queue's thread.
const WAKE: u64 = u64::MAX;
/// `sizeof(struct fuse_in_header)` and `sizeof(struct fuse_out_header)`.
const IN_HEADER: usize = 40;
const OUT_HEADER: usize = 16;

static SERVED: AtomicU64 = AtomicU64::new(0);

/// How many requests this process has served over FUSE-over-io_uring (0 when no mount uses it).
pub fn requests_served() -> u64 {
    SERVED.load(Ordering::Relaxed)
}

/// `struct fuse_uring_ent_in_out`.
#[repr(C)]
struct EntInOut {
    flags: u64,
    commit_id: u64,
    payload_sz: u32,
    padding: u32,
    reserved: u64,
}

/// `struct fuse_uring_req_header`.
#[repr(C)]
struct Header {
    in_out: [u8; 128],
    op_in: [u8; 128],
    ent: EntInOut,
}

const _: () = assert!(size_of::<Header>() == 288);
const _: () = assert!(size_of::<squeue::Entry128>() == 128);

/// One ring entry's buffers. The kernel reads and writes them between a registration or commit
/// and the completion that hands the entry back; in between, only the request being served on
/// it touches them, through raw pointers.
struct Slot {
    header: *mut Header,
    payload: *mut u8,
    iov: Box<[libc::iovec; 2]>,
}

/// One kernel queue: its entries and the replies waiting to be committed.
struct Queue {
    qid: u16,
    fd: RawFd,
    payload_len: usize,
    slots: Vec<Slot>,
    /// Replied entries not yet committed: (slot, commit id).
    replied: Mutex<Vec<(usize, u64)>>,
    wake: OwnedFd,
    thread: ThreadId,
}

// SAFETY: the raw pointers in `slots` point to buffers this queue owns and frees; an entry's
// buffers are touched by one request at a time (see `Slot`).
unsafe impl Send for Queue {}
// SAFETY: as above; `replied` is behind a mutex.
unsafe impl Sync for Queue {}

impl Drop for Queue {
    fn drop(&mut self) {
        for slot in &self.slots {
            // SAFETY: allocated by `Box::into_raw` in `Queue::new`, freed once here.
            unsafe {
                drop(Box::from_raw(slot.header));
                drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                    slot.payload,
                    self.payload_len,
                )));
            }
        }
    }
}

impl Queue {
    fn new(qid: u16, fd: RawFd, payload_len: usize) -> io::Result<Queue> {
        // SAFETY: eventfd has no memory arguments; the result is checked.
        let wake = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if wake < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor this queue now owns.
        let wake = unsafe { OwnedFd::from_raw_fd(wake) };
        let slots = (0..ENTRIES_PER_QUEUE)
            .map(|_| {
                let header = Box::into_raw(Box::new(Header {
                    in_out: [0; 128],
                    op_in: [0; 128],
                    ent: EntInOut {
                        flags: 0,
                        commit_id: 0,
                        payload_sz: 0,
                        padding: 0,
                        reserved: 0,
                    },
                }));
                let payload = Box::into_raw(vec![0u8; payload_len].into_boxed_slice()) as *mut u8;
                let iov = Box::new([
                    libc::iovec {
                        iov_base: header.cast(),
                        iov_len: size_of::<Header>(),
                    },
                    libc::iovec {
                        iov_base: payload.cast(),
                        iov_len: payload_len,
                    },
                ]);
                Slot {
                    header,
                    payload,
                    iov,
                }
            })
            .collect();
        Ok(Queue {
            qid,
            fd,
            payload_len,
            slots,
            replied: Mutex::new(Vec::new()),
            wake,
            thread: thread::current().id(),
        })
    }

    /// An `IORING_OP_URING_CMD` on /dev/fuse for `slot`.
    fn command(&self, cmd_op: u32, slot: usize, commit_id: u64) -> squeue::Entry128 {
        let mut cmd = [0u8; 80];
        cmd[8..16].copy_from_slice(&commit_id.to_ne_bytes());
        cmd[16..18].copy_from_slice(&self.qid.to_ne_bytes());
        let register = cmd_op == CMD_REGISTER;
        let addr = register.then(|| self.slots[slot].iov.as_ptr() as u64);
        let entry = opcode::UringCmd80::new(types::Fd(self.fd), cmd_op)
            .cmd(cmd)
            .addr(addr)
            .build()
            .user_data(slot as u64);
        if !register {
            return entry;
        }
        // Registering passes the entry's two buffers as an iovec array: `sqe->len` must be 2,
        // which the opcode builder has no setter for. The SQE layout is the kernel's ABI:
        // `len` is the u32 at byte 24.
        // SAFETY: Entry128 is `#[repr(C)]`, 128 bytes (asserted above), plain data.
        let mut raw: [u8; 128] = unsafe { std::mem::transmute(entry) };
        raw[24..28].copy_from_slice(&2u32.to_ne_bytes());
        // SAFETY: as above; only the length field changed.
        unsafe { std::mem::transmute(raw) }
    }

    /// A reply is in `slot`: commit it (now, from this queue's thread, or after a wake-up).
    fn replied(&self, slot: usize, commit_id: u64) {
        self.replied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((slot, commit_id));
        if thread::current().id() != self.thread {
            let one = 1u64.to_ne_bytes();
            // SAFETY: writes 8 bytes from a live buffer to our eventfd.
            unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), 8) };
        }
    }
}

/// Where the reply to a request that came over io_uring goes.
#[derive(Clone)]
pub(crate) struct RingReply {
    queue: Arc<Queue>,
    slot: usize,
    commit_id: u64,
    channel: ChannelSender,
}

impl std::fmt::Debug for RingReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RingReply(queue {}, entry {})",
            self.queue.qid, self.slot
        )
    }
}

impl RingReply {
    /// The /dev/fuse channel, for backing-file ioctls.
    pub(crate) fn channel(&self) -> &ChannelSender {
        &self.channel
    }

    /// Writes a reply (`fuse_out_header` and payload, as it would go to /dev/fuse) into the
    /// entry and commits it.
    pub(crate) fn send(&self, data: &[IoSlice<'_>]) -> io::Result<()> {
        let total: usize = data.iter().map(|b| b.len()).sum();
        if total < OUT_HEADER || total - OUT_HEADER > self.queue.payload_len {
            self.fail(libc::EIO);
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a FUSE reply of {total} bytes does not fit a ring entry"),
            ));
        }
        let slot = &self.queue.slots[self.slot];
        let mut at = 0;
        for buf in data {
            let mut buf: &[u8] = buf;
            // SAFETY: this request owns the entry until it is committed; the header gets the
            // first 16 bytes and the payload the rest, which fits (checked above).
            unsafe {
                if at < OUT_HEADER {
                    let n = buf.len().min(OUT_HEADER - at);
                    (&mut (*slot.header).in_out)[at..at + n].copy_from_slice(&buf[..n]);
                    at += n;
                    buf = &buf[n..];
                }
                std::ptr::copy_nonoverlapping(
                    buf.as_ptr(),
                    slot.payload.add(at - OUT_HEADER),
                    buf.len(),
                );
                at += buf.len();
            }
        }
        // SAFETY: as above.
        unsafe { (*slot.header).ent.payload_sz = (total - OUT_HEADER) as u32 };
        self.queue.replied(self.slot, self.commit_id);
        Ok(())
    }

    /// Answers the request with an error.
    fn fail(&self, errno: i32) {
        let mut header = [0u8; OUT_HEADER];
        header[0..4].copy_from_slice(&(OUT_HEADER as u32).to_ne_bytes());
        header[4..8].copy_from_slice(&(-errno).to_ne_bytes());
        header[8..16].copy_from_slice(&self.commit_id.to_ne_bytes());
        let slot = &self.queue.slots[self.slot];
        // SAFETY: as in `send`.
        unsafe {
            (&mut (*slot.header).in_out)[..OUT_HEADER].copy_from_slice(&header);
            (*slot.header).ent.payload_sz = 0;
        }
        self.queue.replied(self.slot, self.commit_id);
    }
}

/// The CPUs the kernel makes queues for: `num_possible_cpus()`, from
/// `/sys/devices/system/cpu/possible` ("0-63", "0,2-3").
fn possible_cpus() -> io::Result<usize> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    let mut count = 0;
    for part in text.trim().split(',') {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let parse = |s: &str| {
            s.parse::<usize>()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
        };
        count += parse(b)? - parse(a)? + 1;
    }
    Ok(count)
}

/// Starts one thread per kernel queue; each ends when the connection does.
pub(crate) fn start<FS: Filesystem + 'static>(
    channel: ChannelSender,
    payload_len: usize,
    event_loop: impl Fn(String) -> SessionEventLoop<FS>,
) -> io::Result<Vec<JoinHandle<io::Result<()>>>> {
    let queues = possible_cpus()?;
    debug!(
        "FUSE over io_uring: {queues} queues, {ENTRIES_PER_QUEUE} entries of {payload_len} bytes each"
    );
    (0..queues)
        .map(|qid| {
            let name = format!("fuser-ring-{qid}");
            let se = event_loop(name.clone());
            let channel = channel.clone();
            thread::Builder::new()
                .name(name)
                .spawn(move || serve(qid as u16, channel, payload_len, se))
        })
        .collect()
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET and sched_setaffinity only touch `set`.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            debug!(
                "could not pin the io_uring thread of queue {cpu}: {}",
                io::Error::last_os_error()
            );
        }
    }
}

fn serve<FS: Filesystem>(
    qid: u16,
    channel: ChannelSender,
    payload_len: usize,
    se: SessionEventLoop<FS>,
) -> io::Result<()> {
    pin_to_cpu(qid as usize);
    let queue = Arc::new(Queue::new(qid, channel.raw_fd(), payload_len)?);
    let depth = (2 * ENTRIES_PER_QUEUE + 2).next_power_of_two() as u32;
    let mut ring: IoUring<squeue::Entry128, cqueue::Entry> = IoUring::builder().build(depth)?;
    let mut wake_buf = [0u8; 8];
    let (wake_fd, wake_ptr) = (queue.wake.as_raw_fd(), wake_buf.as_mut_ptr());
    let wake_read = || -> squeue::Entry128 {
        opcode::Read::new(types::Fd(wake_fd), wake_ptr, 8)
            .build()
            .user_data(WAKE)
            .into()
    };
    let mut pending: Vec<squeue::Entry128> = (0..ENTRIES_PER_QUEUE)
        .map(|slot| queue.command(CMD_REGISTER, slot, 0))
        .collect();
    pending.push(wake_read());
    // The request, put back together in the /dev/fuse layout (8-byte aligned, as parsing wants).
    let mut request = vec![0u64; (IN_HEADER + 128 + payload_len).div_ceil(8)];
    let mut registered = false;
    loop {
        for entry in pending.drain(..) {
            // SAFETY: every buffer an entry names lives in `queue` (or `wake_buf`) for as long as
            // the ring.
            while unsafe { ring.submission().push(&entry) }.is_err() {
                ring.submit()?;
            }
        }
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(e),
        }
        let done: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (user_data, result) in done {
            if user_data == WAKE {
                pending.push(wake_read());
                continue;
            }
            if result < 0 {
                let err = io::Error::from_raw_os_error(-result);
                match -result {
                    // The connection ended (unmount) or the ring is being torn down.
                    libc::ENOTCONN | libc::ECANCELED | libc::ENODEV => return Ok(()),
                    _ if !registered => {
                        warn!(
                            "FUSE over io_uring: registering queue {qid} failed ({err}); requests keep coming through /dev/fuse"
                        );
                        return Ok(());
                    }
                    // A commit the kernel refused: this entry serves no more requests.
                    _ => {
                        warn!("FUSE over io_uring: queue {qid} entry {user_data}: {err}");
                        continue;
                    }
                }
            }
            registered = true;
            let slot = user_data as usize;
            serve_one(&queue, slot, &channel, &se, &mut request);
        }
        let replied = std::mem::take(&mut *queue.replied.lock().unwrap_or_else(|p| p.into_inner()));
        pending.extend(
            replied
                .into_iter()
                .map(|(slot, commit_id)| queue.command(CMD_COMMIT_AND_FETCH, slot, commit_id)),
        );
    }
}

/// Dispatches the request in `slot`; its reply (now or later, from any thread) commits it.
fn serve_one<FS: Filesystem>(
    queue: &Arc<Queue>,
    slot: usize,
    channel: &ChannelSender,
    se: &SessionEventLoop<FS>,
    request: &mut [u64],
) {
    SERVED.fetch_add(1, Ordering::Relaxed);
    let s = &queue.slots[slot];
    // SAFETY: the kernel handed this entry back: it is ours until committed.
    let header = unsafe { &*s.header };
    let commit_id = header.ent.commit_id;
    let payload_sz = header.ent.payload_sz as usize;
    let len = u32::from_ne_bytes(header.in_out[0..4].try_into().expect("4 bytes")) as usize;
    let reply = RingReply {
        queue: queue.clone(),
        slot,
        commit_id,
        channel: channel.clone(),
    };
    // SAFETY: `request` is a live u64 buffer; viewing it as bytes is always valid.
    let bytes = unsafe {
        std::slice::from_raw_parts_mut(request.as_mut_ptr().cast::<u8>(), request.len() * 8)
    };
    let op_len = len
        .checked_sub(IN_HEADER + payload_sz)
        .filter(|&n| n <= header.op_in.len());
    let Some(op_len) = op_len.filter(|_| payload_sz <= queue.payload_len && len <= bytes.len())
    else {
        warn!(
            "FUSE over io_uring: a request of {len} bytes with a {payload_sz}-byte payload does not add up"
        );
        reply.fail(libc::EIO);
        return;
    };
    bytes[..IN_HEADER].copy_from_slice(&header.in_out[..IN_HEADER]);
    bytes[IN_HEADER..IN_HEADER + op_len].copy_from_slice(&header.op_in[..op_len]);
    // SAFETY: as above; `payload_sz` fits the payload buffer (checked).
    let payload = unsafe { std::slice::from_raw_parts(s.payload, payload_sz) };
    bytes[IN_HEADER + op_len..len].copy_from_slice(payload);
    match RequestWithSender::new(RequestSender::Ring(reply.clone()), &bytes[..len]) {
        Some(req) => {
            if let Ok(ll::Operation::Destroy(_)) = req.request.operation() {
                req.reply::<crate::ReplyEmpty>().ok();
            } else {
                req.dispatch(se);
            }
        }
        None => reply.fail(libc::EIO),
    }
}
