//! The resources of a node, as stored and as the API shows them.
//!
//! Every resource is `{id, name, generation, created_at, updated_at, spec,
//! status}`: `spec` is desired state (set by people and tools, each change
//! bumps `generation`), `status` is observed state (set by the agent). The
//! cluster will replicate the same shapes.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Identity and bookkeeping shared by every resource.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, ToSchema)]
pub struct Meta {
    /// Stable id (UUID), never reused.
    pub id: String,
    /// Unique per kind.
    pub name: String,
    /// Bumped by every change of desired state; send it back as `If-Match`
    /// to update.
    pub generation: u64,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
}

impl Meta {
    pub fn new(name: &str) -> Meta {
        let now = now();
        Meta {
            id: uuid::Uuid::new_v4().to_string(),
            name: name.to_string(),
            generation: 1,
            created_at: now.clone(),
            updated_at: now,
        }
    }
}

/// The current time as RFC 3339.
pub fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Image,
    Network,
    Volume,
    Vm,
    Token,
    Node,
    Policy,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Image => "image",
            Kind::Network => "network",
            Kind::Volume => "volume",
            Kind::Vm => "vm",
            Kind::Token => "token",
            Kind::Node => "node",
            Kind::Policy => "policy",
        }
    }
}

/// A stored resource.
pub trait Resource: Serialize + DeserializeOwned + Clone + Send + 'static {
    const KIND: Kind;
    fn meta(&self) -> &Meta;
    fn meta_mut(&mut self) -> &mut Meta;
    /// A one-word observed state for events and tables.
    fn state(&self) -> String;
}

macro_rules! resource {
    ($t:ty, $kind:expr) => {
        impl Resource for $t {
            const KIND: Kind = $kind;
            fn meta(&self) -> &Meta {
                &self.meta
            }
            fn meta_mut(&mut self) -> &mut Meta {
                &mut self.meta
            }
            fn state(&self) -> String {
                serde_json::to_value(&self.status.state)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default()
            }
        }
    };
}

// ---------------------------------------------------------------- images

/// Where an image's files come from.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ImageSource {
    /// A kernel (ELF vmlinux or bzImage) with an optional initramfs and
    /// default command line, from absolute paths on this node.
    Kernel {
        kernel: String,
        #[serde(default)]
        initrd: Option<String>,
        #[serde(default)]
        cmdline: Option<String>,
    },
    /// A raw disk image from an absolute path on this node.
    Disk { path: String },
    /// Files sent over the API after the image is created, each with
    /// `PUT /v1/images/{image}/files/{role}`: a kernel (with an optional
    /// initrd) or a disk. The image is `ready` when all have arrived.
    Upload {
        files: Vec<UploadFile>,
        #[serde(default)]
        cmdline: Option<String>,
    },
}

/// A file an uploaded image will receive, and its exact size.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UploadFile {
    pub role: FileRole,
    pub size: u64,
}

impl ImageSource {
    /// The roles of the files the image will hold.
    pub fn roles(&self) -> Vec<FileRole> {
        match self {
            ImageSource::Kernel { initrd, .. } => {
                let mut v = vec![FileRole::Kernel];
                if initrd.is_some() {
                    v.push(FileRole::Initrd);
                }
                v
            }
            ImageSource::Disk { .. } => vec![FileRole::Disk],
            ImageSource::Upload { files, .. } => files.iter().map(|f| f.role).collect(),
        }
    }

    /// A kernel image (VMs boot it), as opposed to a disk image.
    pub fn is_kernel(&self) -> bool {
        self.roles().contains(&FileRole::Kernel)
    }

    /// The default command line of VMs booting this image.
    pub fn cmdline(&self) -> Option<&str> {
        match self {
            ImageSource::Kernel { cmdline, .. } | ImageSource::Upload { cmdline, .. } => {
                cmdline.as_deref()
            }
            ImageSource::Disk { .. } => None,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageSpec {
    pub source: ImageSource,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ImageState {
    Importing,
    Ready,
    Failed,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FileRole {
    Kernel,
    Initrd,
    Disk,
}

impl std::fmt::Display for FileRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FileRole::Kernel => "kernel",
            FileRole::Initrd => "initrd",
            FileRole::Disk => "disk",
        })
    }
}

/// One content-addressed file of an image.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, ToSchema)]
pub struct ImageFile {
    pub role: FileRole,
    /// Hex SHA-256 of the content; the blob is `images/sha256/<sha256>`.
    pub sha256: String,
    pub size: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, ToSchema)]
pub struct ImageStatus {
    pub state: ImageState,
    #[serde(default)]
    pub reason: Option<String>,
    /// Import progress.
    pub bytes_total: u64,
    pub bytes_done: u64,
    #[serde(default)]
    pub files: Vec<ImageFile>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, ToSchema)]
pub struct Image {
    #[serde(flatten)]
    pub meta: Meta,
    pub spec: ImageSpec,
    pub status: ImageStatus,
}
resource!(Image, Kind::Image);

impl Image {
    pub fn file(&self, role: FileRole) -> Option<&ImageFile> {
        self.status.files.iter().find(|f| f.role == role)
    }
}

// ---------------------------------------------------------------- image policy

/// What the node does with a VM whose kernel, initrd or base disk image
/// is not approved.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PolicyMode {
    /// The VM starts; an event records each unapproved image.
    #[default]
    Audit,
    /// The VM does not start; its state says which image is not approved.
    Enforce,
}

impl PolicyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyMode::Audit => "audit",
            PolicyMode::Enforce => "enforce",
        }
    }
}

/// An approved image file, by content.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApprovedDigest {
    /// Hex SHA-256 of a kernel, initrd or disk image file.
    pub sha256: String,
    /// What it is, for people.
    #[serde(default)]
    pub note: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImagePolicySpec {
    #[serde(default)]
    pub mode: PolicyMode,
    #[serde(default)]
    pub approved: Vec<ApprovedDigest>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PolicyState {
    Active,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, ToSchema)]
pub struct ImagePolicyStatus {
    pub state: PolicyState,
}

/// The node's image policy (one, named `images`): which kernels, initrds
/// and disk images VMs may start from. Only admins change it; every
/// change is an event.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, ToSchema)]
pub struct ImagePolicy {
    #[serde(flatten)]
    pub meta: Meta,
    pub spec: ImagePolicySpec,
    pub status: ImagePolicyStatus,
}
resource!(ImagePolicy, Kind::Policy);

/// The one image policy's name.
pub const IMAGE_POLICY: &str = "images";

#[derive(Serialize, Deserialize, Clone, Debug, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateImagePolicy {
    /// The generation this change was based on (or send `If-Match`).
    #[serde(default)]
    pub generation: Option<u64>,
    pub spec: ImagePolicySpec,
}

// ---------------------------------------------------------------- networks

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    /// The Linux bridge's name (at most 15 characters); default `kb-` and
    /// the network's name.
    #[serde(default)]
    pub bridge: Option<String>,
    /// An existing interface to enslave to the bridge (the way out).
    #[serde(default)]
    pub uplink: Option<String>,
    /// With `uplink`: a VLAN id (1-4094); the bridge then gets a VLAN
    /// sub-interface of the uplink instead of the uplink itself.
    #[serde(default)]
    pub vlan: Option<u16>,
    /// An address for the node on this network, e.g. `10.7.0.1/24`.
    #[serde(default)]
    pub address: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum NetworkState {
    Ready,
    Failed,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, ToSchema)]
pub struct NetworkStatus {
    pub state: NetworkState,
    pub bridge: String,
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, ToSchema)]
pub struct Network {
    #[serde(flatten)]
    pub meta: Meta,
    pub spec: NetworkSpec,
    pub status: NetworkStatus,
}
resource!(Network, Kind::Network);

// ---------------------------------------------------------------- volumes

/// What a new volume holds.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum VolumeSource {
    /// Zeros.
    #[default]
    Blank,
    /// A copy of a disk image (name or id).
    Image { image: String },
    /// A copy-on-write clone of a snapshot of another volume.
    Snapshot { volume: String, snapshot: String },
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeSpec {
    /// Bytes, a multiple of 4096 (at least the image's size).
    pub size_bytes: u64,
    #[serde(default)]
    pub source: VolumeSource,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VolumeState {
    Creating,
    Ready,
    Failed,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, ToSchema)]
pub struct ReplicaHealth {
    pub node: String,
    /// `in-sync`, `stale`, `resyncing` or `unknown`.
    pub state: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, ToSchema)]
pub struct VolumeStatus {
    pub state: VolumeState,
    #[serde(default)]
    pub reason: Option<String>,
    /// Bytes copied from the image so far.
    #[serde(default)]
    pub bytes_done: u64,
    #[serde(default)]
    pub replicas: Vec<ReplicaHealth>,
    #[serde(default)]
    pub snapshots: Vec<String>,
    /// Encrypted at rest (XTS-AES-256, a key of its own wrapped by the
    /// node's TPM-sealed KEK).
    #[serde(default)]
    pub encrypted: bool,
    /// The public fingerprint of the volume's key.
    #[serde(default)]
    pub key_check: Option<String>,
    /// An online re-encryption with a new key, while it runs.
    #[serde(default)]
    pub rekey: Option<RekeyProgress>,
}

/// Bytes of a volume re-encrypted so far.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, ToSchema)]
pub struct RekeyProgress {
    pub done: u64,
    pub total: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, ToSchema)]
pub struct Volume {
    #[serde(flatten)]
    pub meta: Meta,
    pub spec: VolumeSpec,
    pub status: VolumeStatus,
}
resource!(Volume, Kind::Volume);

#[derive(Serialize, Deserialize, Clone, Debug, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVolume {
    pub name: String,
    pub spec: VolumeSpec,
}

#[derive(Serialize, Deserialize, Clone, Debug, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResizeVolume {
    /// The generation this change was based on (or send `If-Match`).
    #[serde(default)]
    pub generation: Option<u64>,
    pub size_bytes: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshot {
    pub name: String,
}

// ---------------------------------------------------------------- VMs

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RestartPolicy {
    /// Stay stopped or failed.
    #[default]
    Never,
    /// Start again (with backoff) when kiln-vmm fails.
    OnFailure,
    /// Start again (with backoff) whenever the VM ends without being asked to.
    Always,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmBoot {
    /// A kernel image (name or id).
    pub image: String,
    /// Kernel command line; default the image's, else `console=ttyS0`.
    #[serde(default)]
    pub cmdline: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmDisk {
    /// A volume (name or id).
    pub volume: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmNic {
    /// A network (name or id).
    pub network: String,
    /// A unicast MAC; default a stable one derived from the VM's id.
    #[serde(default)]
    pub mac: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// 1-64.
    pub vcpus: u32,
    /// Guest RAM in MiB, 16-1048576.
    pub memory_mib: u64,
    pub boot: VmBoot,
    #[serde(default)]
    pub disks: Vec<VmDisk>,
    #[serde(default)]
    pub nics: Vec<VmNic>,
    #[serde(default)]
    pub restart_policy: RestartPolicy,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    Stopped,
    Starting,
    Running,
    Stopping,
    Paused,
    Failed,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DesiredVmState {
    Running,
    Paused,
    Stopped,
}

/// A NIC as it was set up for the VM's current run.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, ToSchema)]
pub struct NicStatus {
    pub network: String,
    pub tap: String,
    pub mac: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, ToSchema)]
pub struct VmStatus {
    pub state: VmState,
    /// Why the VM failed, or why it stopped when it was not asked to.
    #[serde(default)]
    pub reason: Option<String>,
    /// kiln-vmm's process id while it runs.
    #[serde(default)]
    pub pid: Option<u32>,
    #[serde(default)]
    pub started_at: Option<String>,
    /// Restarts made by the restart policy since the last start request.
    #[serde(default)]
    pub restarts: u32,
    #[serde(default)]
    pub nics: Vec<NicStatus>,
    /// The volumes attached and exported for the current run.
    #[serde(default)]
    pub disks: Vec<String>,
    /// The cgroup holding kiln-vmm, when cgroup v2 is available.
    #[serde(default)]
    pub cgroup: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, ToSchema)]
pub struct Vm {
    #[serde(flatten)]
    pub meta: Meta,
    pub spec: VmSpec,
    /// What the VM should be doing.
    pub desired: DesiredVmState,
    pub status: VmStatus,
}
resource!(Vm, Kind::Vm);

// ---------------------------------------------------------------- tokens

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything.
    #[default]
    Admin,
    /// GET only.
    Reader,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TokenState {
    Active,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, ToSchema)]
pub struct TokenStatus {
    pub state: TokenState,
    #[serde(default)]
    pub last_used_at: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenSpec {
    #[serde(default)]
    pub role: Role,
}

/// An API token as stored: only the SHA-256 of its secret is kept.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Token {
    #[serde(flatten)]
    pub meta: Meta,
    pub spec: TokenSpec,
    pub status: TokenStatus,
    pub secret_sha256: String,
}
resource!(Token, Kind::Token);

/// An API token as the API shows it (never its secret or hash).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, ToSchema)]
pub struct TokenInfo {
    #[serde(flatten)]
    pub meta: Meta,
    pub spec: TokenSpec,
    pub status: TokenStatus,
}

impl From<Token> for TokenInfo {
    fn from(t: Token) -> Self {
        TokenInfo {
            meta: t.meta,
            spec: t.spec,
            status: t.status,
        }
    }
}

/// A token just created: the only time its value is shown.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, ToSchema)]
pub struct NewToken {
    #[serde(flatten)]
    pub info: TokenInfo,
    /// The bearer token. Shown once; the agent keeps only its hash.
    pub token: String,
}

// ---------------------------------------------------------------- events

/// One state change, in the order the agent made them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, ToSchema)]
pub struct Event {
    /// Increases by one per event; resume with `?since=<seq>`.
    pub seq: u64,
    pub time: String,
    pub kind: Kind,
    pub id: String,
    pub name: String,
    /// `created`, `updated`, `deleted` or `state`.
    pub action: String,
    /// The resource's observed state after the change.
    pub state: String,
    pub generation: u64,
    #[serde(default)]
    pub message: Option<String>,
}

// ---------------------------------------------------------------- requests

#[derive(Serialize, Deserialize, Clone, Debug, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateImage {
    pub name: String,
    pub spec: ImageSpec,
}

#[derive(Serialize, Deserialize, Clone, Debug, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateNetwork {
    pub name: String,
    #[serde(default)]
    pub spec: NetworkSpec,
}

#[derive(Serialize, Deserialize, Clone, Debug, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    pub name: String,
    pub spec: VmSpec,
}

#[derive(Serialize, Deserialize, Clone, Debug, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateVm {
    /// The generation this change was based on (or send `If-Match`).
    #[serde(default)]
    pub generation: Option<u64>,
    pub spec: VmSpec,
}

#[derive(Serialize, Deserialize, Clone, Debug, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    pub name: String,
    #[serde(default)]
    pub spec: TokenSpec,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ShutdownRequest {
    /// Seconds to wait for the guest to power off before powering it off;
    /// default 30, at most 3600.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

/// This node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, ToSchema)]
pub struct NodeInfo {
    pub id: String,
    pub name: String,
    pub version: String,
    /// This agent binary's build: its cargo profile and its size (so that
    /// an upgrade shows which binary serves).
    pub build: String,
    pub started_at: String,
    /// SHA-256 of the node's TLS certificate (DER), for pinning.
    pub cert_sha256: String,
    /// Whether cgroup v2 is available for VM limits.
    pub cgroup_v2: bool,
    /// Initialized with `--insecure-no-tpm`: no attestation, and the key
    /// that wraps the volume keys is on disk unprotected.
    #[serde(default)]
    pub insecure_no_tpm: bool,
}
