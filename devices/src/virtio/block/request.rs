//! virtio-blk requests: the one parser, shared with kiln-store's
//! vhost-user-blk export, lives in [`kiln_block::request`].

pub use kiln_block::request::*;
