//! `vmfs scsi ...`: paravirtual SCSI controllers, served by this machine's
//! host agent (the `vmfs mount` process) to QEMU/KVM guests.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use host::scsi::ControllerInfo;
use serde_json::json;

#[derive(Subcommand)]
pub(crate) enum ScsiCmd {
    /// One controller for one VM: each DISK (MOUNTPOINT/.../NAME.vmdk) is a
    /// LUN, in order. QEMU connects with
    /// `-chardev socket,id=c0,path=SOCK -device vhost-user-scsi-pci,chardev=c0,num_queues=N`
    /// and shared guest memory. On a controller that exists, the disks are
    /// added as new LUNs (hot-plugged into a running guest).
    Add {
        /// The vhost-user socket QEMU connects to.
        #[arg(long)]
        socket: PathBuf,
        /// The request queues QEMU is given (its num_queues; any up to 16 is
        /// served): sizes the I/O threads.
        #[arg(long, default_value_t = 1)]
        queues: usize,
        /// The guest's qemu-guest-agent socket (QEMU's
        /// `-chardev socket,path=QGA-SOCKET,server=on,wait=off,id=qga0
        /// -device virtio-serial -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0`):
        /// snapshots a backup takes freeze the guest's filesystems through it.
        #[arg(long, value_name = "QGA-SOCKET")]
        guest_agent: Option<PathBuf>,
        #[arg(required = true)]
        disks: Vec<PathBuf>,
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Stop serving a controller and close its disks; refused while QEMU is
    /// connected.
    Remove {
        #[arg(long)]
        socket: PathBuf,
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// The controllers of this machine's hosts: LUNs, connected or not, I/O
    /// counters.
    List {
        #[arg(long)]
        json: bool,
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
}

fn abs(p: &Path) -> Result<PathBuf> {
    Ok(if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()?.join(p)
    })
}

/// Every host agent of this machine.
fn agents(state_dir: &Path) -> Result<Vec<host::client::Client>> {
    let mut out = Vec::new();
    for st in host::client::all(state_dir)?.into_iter().flatten() {
        if let Some(c) = host::client::find(state_dir, &st.datastore)? {
            out.push(c);
        }
    }
    Ok(out)
}

pub(crate) fn run(c: ScsiCmd) -> Result<std::process::ExitCode> {
    match c {
        ScsiCmd::Add {
            socket,
            queues,
            guest_agent,
            disks,
            state_dir,
        } => {
            let state_dir = host::socket::state_dir(state_dir.as_deref(), None);
            let (mut agent, _, inner) = host::client::at_paths(&disks, &state_dir).context(
                "a controller is served by the host that has the datastore of its disks mounted",
            )?;
            let i: ControllerInfo = agent.call(
                "scsi-add",
                json!({
                    "socket": abs(&socket)?,
                    "queues": queues,
                    "disks": inner,
                    "guest_agent": guest_agent.as_deref().map(abs).transpose()?,
                }),
            )?;
            print(&i);
        }
        ScsiCmd::Remove { socket, state_dir } => {
            let state_dir = host::socket::state_dir(state_dir.as_deref(), None);
            let socket = abs(&socket)?;
            let mut last = None;
            for mut a in agents(&state_dir)? {
                match a.call::<ControllerInfo>("scsi-remove", json!({ "socket": socket })) {
                    Ok(i) => {
                        println!("removed the controller on {}", i.socket);
                        return Ok(std::process::ExitCode::SUCCESS);
                    }
                    Err(e) if e.class() == "NotFound" => last = Some(e),
                    Err(e) => return Err(e.into()),
                }
            }
            match last {
                Some(e) => return Err(e.into()),
                None => bail!(
                    "no host agent runs on this machine ({})",
                    host::socket::run_dir(&state_dir).display()
                ),
            }
        }
        ScsiCmd::List { json, state_dir } => {
            let state_dir = host::socket::state_dir(state_dir.as_deref(), None);
            let mut all = Vec::new();
            for mut a in agents(&state_dir)? {
                all.extend(a.call::<Vec<ControllerInfo>>("scsi-list", serde_json::Value::Null)?);
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else if all.is_empty() {
                println!("no controller");
            } else {
                for i in &all {
                    print(i);
                }
            }
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

fn print(i: &ControllerInfo) {
    println!(
        "controller {}  {} queue(s)  {}{}",
        i.socket,
        i.queues,
        if i.connected {
            "connected"
        } else {
            "waiting for QEMU"
        },
        i.guest_agent
            .as_ref()
            .map(|g| format!("  guest agent {g}"))
            .unwrap_or_default()
    );
    for l in &i.luns {
        println!(
            "  LUN {:<3} {}  {} bytes{}  reads {} ({} B)  writes {} ({} B)  discards {}  errors {}",
            l.lun,
            l.disk,
            l.size,
            if l.thin { " thin" } else { "" },
            l.reads,
            l.read_bytes,
            l.writes,
            l.write_bytes,
            l.discards,
            l.errors
        );
    }
}
