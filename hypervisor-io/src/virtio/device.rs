//! The vhost-user-scsi device of one connection: feature negotiation, the
//! three kinds of queue (control, event, requests), and the hand-off of
//! each request to the controller's I/O threads so that many are in
//! flight per queue. A new `Device` is built for every connection (the
//! library's exit events cannot be reused); the target and the I/O
//! threads outlive it.
//!
//! Queue 0 is the control queue, 1 the event queue, 2.. the request
//! queues, all watched by one epoll thread.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::{DescriptorChain, QueueOwnedT, Reader, Writer};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::wire::{self, Address};
use super::Shared;
use crate::scsi::disk::Buffers;
use crate::scsi::target::Target;

pub type Mem = GuestMemoryAtomic<GuestMemoryMmap<()>>;
pub type Chain = DescriptorChain<GuestMemoryLoadGuard<GuestMemoryMmap<()>>>;
pub type Vring = VringRwLock<Mem>;

const VIRTIO_F_VERSION_1: u64 = 32;
const VIRTIO_RING_F_INDIRECT_DESC: u64 = 28;
const VIRTIO_RING_F_EVENT_IDX: u64 = 29;
const VIRTIO_SCSI_F_HOTPLUG: u64 = 1;
const VIRTIO_SCSI_F_CHANGE: u64 = 2;

/// QEMU's default virtqueue size; larger is refused by the library.
pub const QUEUE_SIZE: usize = 128;
/// The most data one request may carry either way.
const MAX_DATA: usize = 32 << 20;

pub struct Device {
    shared: Arc<Shared>,
    mem: Mutex<Option<Mem>>,
    event_idx: AtomicBool,
    /// The epoll thread's exit event.
    exits: Vec<(EventConsumer, EventNotifier)>,
}

impl Device {
    pub fn new(shared: Arc<Shared>) -> std::io::Result<Device> {
        let exits = (0..1)
            .map(|_| new_event_consumer_and_notifier(EventFlag::NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Device {
            shared,
            mem: Mutex::new(None),
            event_idx: AtomicBool::new(false),
            exits,
        })
    }

    /// Stop the epoll threads (after the connection ended).
    pub fn exit(&self) {
        for (_, n) in &self.exits {
            let _ = n.notify();
        }
    }

    fn memory(&self) -> std::io::Result<Mem> {
        self.mem
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| {
                std::io::Error::other("a queue was kicked before the guest memory was set")
            })
    }

    /// Take every available chain of `vring`.
    fn pop_all(&self, vring: &Vring) -> std::io::Result<Vec<Chain>> {
        let mem = self.memory()?;
        let mut g = vring.get_mut();
        let q = g.get_queue_mut();
        Ok(q.iter(mem.memory())
            .map_err(std::io::Error::other)?
            .collect())
    }

    /// Drain `vring` with `f` per chain, re-enabling notifications the way
    /// EVENT_IDX wants (no kick lost between the last pop and the enable).
    fn drain(&self, vring: &Vring, mut f: impl FnMut(Chain)) -> std::io::Result<()> {
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        loop {
            if event_idx {
                vring
                    .disable_notification()
                    .map_err(std::io::Error::other)?;
            }
            let chains = self.pop_all(vring)?;
            tracing::trace!("{}: {} request(s) taken", self.shared.name, chains.len());
            for c in chains {
                f(c);
            }
            if !event_idx || !vring.enable_notification().map_err(std::io::Error::other)? {
                return Ok(());
            }
        }
    }

    fn request_queue(&self, vring: &Vring) -> std::io::Result<()> {
        let shared = &self.shared;
        self.drain(vring, |chain| {
            let s = shared.clone();
            let v = vring.clone();
            shared.inflight.begin();
            shared.pool.submit(Box::new(move || {
                let head = chain.head_index();
                let used = command(&s.target, &s.nexus, chain);
                complete(&v, head, used);
                s.inflight.end();
            }));
        })
    }

    fn control_queue(&self, vring: &Vring) -> std::io::Result<()> {
        let shared = &self.shared;
        let mut done = Vec::new();
        self.drain(vring, |chain| {
            let head = chain.head_index();
            done.push((head, control(shared, chain)));
        })?;
        for (head, used) in done {
            complete(vring, head, used);
        }
        Ok(())
    }

    fn event_queue(&self, vring: &Vring) -> std::io::Result<()> {
        let mut ev = self.shared.events.lock().unwrap_or_else(|p| p.into_inner());
        ev.vring = Some(vring.clone());
        self.drain(vring, |chain| ev.buffers.push_back(chain))?;
        ev.deliver();
        Ok(())
    }
}

/// Put a chain on the used ring and tell the guest if it wants to know.
fn complete(vring: &Vring, head: u16, used: u32) {
    if let Err(e) = vring.add_used(head, used) {
        tracing::warn!("virtio-scsi: completing descriptor {head}: {e}");
        return;
    }
    match vring.needs_notification() {
        Ok(false) => {}
        _ => {
            if let Err(e) = vring.signal_used_queue() {
                tracing::warn!("virtio-scsi: signalling the guest: {e}");
            }
        }
    }
}

thread_local! {
    /// Each I/O thread's data buffers, reused from request to request.
    static BUFFERS: std::cell::RefCell<(Vec<u8>, Vec<u8>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Carry out one command request from initiator `nexus`; returns the
/// bytes written to the guest. A chain too malformed to answer (no room for
/// a response, memory outside the guest's) is completed with nothing
/// written. Public for the fuzzer, which feeds it chains of any shape.
pub fn command<T>(target: &Target, nexus: &str, chain: DescriptorChain<T>) -> u32
where
    T: std::ops::Deref<Target = GuestMemoryMmap<()>> + Clone,
{
    let mem = chain.memory();
    let mut reader = match Reader::<()>::new(mem, chain.clone()) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("virtio-scsi: a request's readable buffers: {e}");
            return 0;
        }
    };
    let mut writer = match Writer::<()>::new(mem, chain.clone()) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!("virtio-scsi: a request's writable buffers: {e}");
            return 0;
        }
    };
    if writer.available_bytes() < wire::CMD_RESP_LEN {
        tracing::warn!("virtio-scsi: a request with no room for its response");
        return 0;
    }
    let mut body = match writer.split_at(wire::CMD_RESP_LEN) {
        Ok(b) => b,
        Err(_) => return 0,
    };
    let respond = |w: &mut Writer<'_, ()>, hdr: [u8; wire::CMD_RESP_LEN], extra: usize| -> u32 {
        match w.write_all(&hdr) {
            Ok(()) => (wire::CMD_RESP_LEN + extra) as u32,
            Err(_) => 0,
        }
    };
    let mut hdr = [0u8; wire::CMD_REQ_LEN];
    if reader.read_exact(&mut hdr).is_err() {
        return respond(
            &mut writer,
            wire::cmd_response(0, wire::resp::FAILURE, 0, &[]),
            0,
        );
    }
    let lun = match wire::address(&hdr[0..8]) {
        Address::Lun(l) => l,
        Address::ReportLuns => 0,
        Address::Bad => {
            return respond(
                &mut writer,
                wire::cmd_response(0, wire::resp::BAD_TARGET, 0, &[]),
                0,
            )
        }
    };
    let cdb = &hdr[19..19 + wire::CDB_SIZE];
    let out_len = reader.available_bytes();
    let in_max = body.available_bytes();
    if out_len > MAX_DATA || in_max > MAX_DATA + (1 << 20) {
        return respond(
            &mut writer,
            wire::cmd_response(0, wire::resp::OVERRUN, 0, &[]),
            0,
        );
    }
    BUFFERS.with(|b| {
        let (ref mut out, ref mut inb) = *b.borrow_mut();
        out.resize(out_len, 0);
        if reader.read_exact(out).is_err() {
            return respond(
                &mut writer,
                wire::cmd_response(0, wire::resp::FAILURE, 0, &[]),
                0,
            );
        }
        let o = target.execute(
            nexus,
            lun,
            cdb,
            Buffers {
                data_out: out,
                data_in: inb,
                data_in_max: in_max,
            },
        );
        let status = o.status();
        let n = o.data_len().min(inb.len());
        let sense = o.sense().map(|s| s.fixed().to_vec()).unwrap_or_default();
        if n > 0 && body.write_all(&inb[..n]).is_err() {
            return respond(
                &mut writer,
                wire::cmd_response(0, wire::resp::FAILURE, 0, &[]),
                0,
            );
        }
        let resid = if in_max > 0 { in_max - n } else { 0 };
        respond(
            &mut writer,
            wire::cmd_response(status, wire::resp::OK, resid as u32, &sense),
            n,
        )
    })
}

/// Carry out one control request: task management or an asynchronous
/// notification query.
fn control(s: &Shared, chain: Chain) -> u32 {
    let mem = chain.memory();
    let (Ok(mut reader), Ok(mut writer)) = (
        Reader::<()>::new(mem, chain.clone()),
        Writer::<()>::new(mem, chain.clone()),
    ) else {
        return 0;
    };
    let mut req = [0u8; wire::TMF_REQ_LEN];
    let n = reader.read(&mut req).unwrap_or(0);
    if n < 4 {
        return 0;
    }
    let kind = wire::le32(&req[0..4]);
    match kind {
        wire::ctrl::T_TMF if n >= wire::TMF_REQ_LEN => {
            let sub = wire::le32(&req[4..8]);
            let r = tmf(s, sub, wire::address(&req[8..16]));
            if writer.write_all(&[r]).is_ok() {
                1
            } else {
                0
            }
        }
        wire::ctrl::T_AN_QUERY | wire::ctrl::T_AN_SUBSCRIBE if n >= wire::AN_REQ_LEN => {
            // No asynchronous notifications: event_actual 0.
            let mut r = [0u8; 5];
            r[4] = wire::resp::OK;
            if writer.write_all(&r).is_ok() {
                5
            } else {
                0
            }
        }
        _ => {
            tracing::warn!("virtio-scsi: control request of type {kind} ({n} bytes) refused");
            let _ = writer.write_all(&[wire::resp::FAILURE]);
            1
        }
    }
}

/// Task management. Commands cannot be withdrawn from the LUN once they
/// reached it, so ABORT and the resets wait until every command in flight
/// has completed, then report the function complete: when the guest hears
/// back, nothing it asked to stop is still running.
fn tmf(s: &Shared, sub: u32, addr: Address) -> u8 {
    use wire::ctrl::*;
    let lun = match addr {
        Address::Lun(l) => l,
        _ => return wire::resp::BAD_TARGET,
    };
    if s.target.unit(lun).is_none() {
        return wire::resp::INCORRECT_LUN;
    }
    match sub {
        TMF_ABORT_TASK | TMF_ABORT_TASK_SET | TMF_CLEAR_TASK_SET | TMF_CLEAR_ACA => {
            s.inflight.wait_idle();
            wire::resp::OK
        }
        TMF_LOGICAL_UNIT_RESET | TMF_I_T_NEXUS_RESET => {
            s.inflight.wait_idle();
            s.target.reset(lun);
            tracing::info!("{}: LUN {lun} reset by the guest", s.name);
            wire::resp::OK
        }
        // Nothing stays queued once the command is done.
        TMF_QUERY_TASK | TMF_QUERY_TASK_SET => wire::resp::OK,
        _ => wire::resp::FUNCTION_REJECTED,
    }
}

/// The event queue's side: buffers the guest gave us, events waiting for
/// a buffer.
#[derive(Default)]
pub struct Events {
    vring: Option<Vring>,
    buffers: VecDeque<Chain>,
    waiting: VecDeque<[u8; wire::EVENT_LEN]>,
    missed: bool,
}

/// At most this many events wait for buffers; beyond, the guest is told
/// it missed some (and rescans).
const MAX_WAITING: usize = 64;

impl Events {
    pub fn push(&mut self, ev: [u8; wire::EVENT_LEN]) {
        if self.waiting.len() >= MAX_WAITING {
            self.missed = true;
        } else {
            self.waiting.push_back(ev);
        }
        self.deliver();
    }

    /// The connection ended: its buffers are gone with it.
    pub fn disconnect(&mut self) {
        self.vring = None;
        self.buffers.clear();
    }

    fn deliver(&mut self) {
        let Some(vring) = self.vring.clone() else {
            return;
        };
        while let Some(chain) = self.buffers.front() {
            let ev = if self.missed {
                let mut e = wire::event(0, 0, 0);
                e[0..4].copy_from_slice(&wire::event::EVENTS_MISSED.to_le_bytes());
                e
            } else if let Some(e) = self.waiting.front() {
                *e
            } else {
                return;
            };
            let chain = chain.clone();
            self.buffers.pop_front();
            let head = chain.head_index();
            let wrote = match Writer::<()>::new(chain.memory(), chain.clone()) {
                Ok(mut w) => w.write_all(&ev).is_ok(),
                Err(_) => false,
            };
            if wrote {
                if self.missed {
                    self.missed = false;
                } else {
                    self.waiting.pop_front();
                }
            }
            complete(&vring, head, if wrote { wire::EVENT_LEN as u32 } else { 0 });
        }
    }
}

impl VhostUserBackend for Device {
    type Bitmap = ();
    type Vring = Vring;

    /// Always room for [`MAX_REQUEST_QUEUES`]: QEMU checks its
    /// `num_queues` (request queues) against this count of all queues, so
    /// a smaller count would let it set up a queue we do not have and drop
    /// the connection. Queues QEMU does not use are never enabled.
    fn num_queues(&self) -> usize {
        2 + super::MAX_REQUEST_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_SCSI_F_HOTPLUG)
            | (1 << VIRTIO_SCSI_F_CHANGE)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        tracing::debug!("{}: guest features {features:#x}", self.shared.name);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn update_memory(&self, mem: Mem) -> std::io::Result<()> {
        *self.mem.lock().unwrap_or_else(|p| p.into_inner()) = Some(mem);
        Ok(())
    }

    /// One epoll thread for every queue: it only takes requests off the
    /// rings (the I/O threads carry them out). The library also reads the
    /// kick of `vrings[device_event]`, which is right only when the event
    /// number is the queue number, that is with one thread.
    fn queues_per_thread(&self) -> Vec<u64> {
        vec![(1u64 << self.num_queues()) - 1]
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (c, n) = self.exits.get(thread_index)?;
        Some((c.try_clone().ok()?, n.try_clone().ok()?))
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> std::io::Result<()> {
        if evset != EventSet::IN {
            tracing::debug!(
                "{}: event {device_event} with {evset:?} ignored",
                self.shared.name
            );
            return Ok(());
        }
        let _ = thread_id;
        let queue = usize::from(device_event);
        let Some(vring) = vrings.get(queue) else {
            return Ok(());
        };
        tracing::trace!("{}: queue {queue} kicked", self.shared.name);
        match queue {
            0 => self.control_queue(vring),
            1 => self.event_queue(vring),
            _ => self.request_queue(vring),
        }
    }
}
