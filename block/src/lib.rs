//! virtio-blk requests, shared by the two devices Kiln serves disks with:
//! kiln-vmm's virtio-blk device (`kiln-devices`) and kiln-store's
//! vhost-user-blk export. Both parse a guest's descriptor chain with
//! [`request::parse`], so they accept and refuse the same requests.
//!
//! Pure code over guest memory: nothing here touches a disk.

pub mod request;
