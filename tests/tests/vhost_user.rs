//! A vhost-user-blk disk end to end, in the test host: qemu-storage-daemon
//! serves a raw image; the Debian guest, booted by kiln-vmm with
//! `--disk vhost-user=SOCKET`, writes a pseudo-random pattern to it, reads
//! it back, and the image file on the test host must hold the same bytes.
//! Then, in the same test-host boot, the daemon is killed under a running
//! guest: kiln-vmm must log it and keep running (the guest's I/O on that
//! disk hangs) until the guest powers off. Last, kiln-store: two store
//! daemons in the test host hold a 2-replica volume; kiln-vmm, given
//! `--disk volume=NAME,store=SOCKET`, has the writer attach it and export it
//! over vhost-user; a guest writes to it, and after the guest powers off
//! each replica, read on its own node, holds what the guest wrote. And a
//! volume with two queues on a two-vCPU guest is resized while the guest
//! runs (`kiln-store volume resize`): the guest sees the new size (the
//! store's config-change message, relayed by kiln-vmm as a config
//! interrupt) and uses the new space.
//!
//! The test host runs without nested paging (`--no-npt`), which makes the
//! nested environment's guest deaths rare; the cross-node migration case
//! still moves once more if its guest dies of a triple fault.

use std::sync::OnceLock;
use std::time::Duration;

use kiln_tests::{
    field, profile_binary, require_testhost, target_dir, write_script_disk, HostRun, TestHost,
    GUEST_READY, GUEST_SCRIPT_EXIT,
};

/// Size of the image qemu-storage-daemon exports.
const DISK_MIB: u64 = 64;
/// How much of it the guest writes and reads back.
const PATTERN_MIB: u64 = 32;
/// The resized volume's new size.
const RESIZED_MIB: u64 = 2 * DISK_MIB;

/// Runs in the guest (from the script disk, /dev/vdb): the vhost-user disk
/// is /dev/vda.
fn guest_script() -> String {
    format!(
        r#"echo "VU-GUEST-CAPACITY sectors=$(cat /sys/block/vda/size)"
dd if=/dev/urandom of=/run/pattern bs=1M count={PATTERN_MIB} 2>/dev/null
set -- $(md5sum /run/pattern); echo "VU-GUEST-WROTE md5=$1"
dd if=/run/pattern of=/dev/vda bs=1M conv=fsync 2>/dev/null || echo VU-GUEST-WRITE-FAILED
rm /run/pattern
sync
echo 3 >/proc/sys/vm/drop_caches
set -- $(dd if=/dev/vda bs=1M count={PATTERN_MIB} 2>/dev/null | md5sum); echo "VU-GUEST-READBACK md5=$1"
"#
    )
}

/// The second guest: writes one block, waits while the test host kills the
/// backend, then tries to read a block it never read before.
const KILLED_BACKEND_SCRIPT: &str = r#"dd if=/dev/urandom of=/dev/vda bs=4k count=1 conv=fsync 2>/dev/null && echo VU2-WRITTEN
sleep 15
echo 3 >/proc/sys/vm/drop_caches
(dd if=/dev/vda of=/dev/null bs=4k count=1 skip=8192 2>/dev/null && echo VU2-READ-DONE) &
sleep 15
echo VU2-GIVING-UP
"#;

/// The resize guest: prints its size and queues, waits for the size to
/// change, then writes and reads back a block past the old end.
const RESIZE_SCRIPT: &str = r#"before=$(cat /sys/block/vda/size)
echo "RS-BEFORE sectors=$before queues=$(ls /sys/block/vda/mq | wc -l)"
echo RS-WAITING
i=0
while [ "$(cat /sys/block/vda/size)" = "$before" ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i + 1)); done
echo "RS-AFTER sectors=$(cat /sys/block/vda/size)"
dd if=/dev/urandom of=/run/blk bs=64k count=1 2>/dev/null
set -- $(md5sum /run/blk); w=$1
at=$((before / 128 + 1))
dd if=/run/blk of=/dev/vda bs=64k seek=$at count=1 oflag=direct 2>/dev/null && echo RS-WROTE-PAST-OLD-END
set -- $(dd if=/dev/vda bs=64k skip=$at count=1 iflag=direct 2>/dev/null | md5sum)
[ "$1" = "$w" ] && echo RS-READBACK-SAME
"#;

/// The volume-migration guest: writes block n (its number in the block)
/// with O_DIRECT and an fsync, n = 1, 2, ..., and says `VM-ACK n=N` once
/// the write returned: what it saw acknowledged.
const VOLUME_WRITER_SCRIPT: &str = r#"# A reader goes over the blocks written so far, again and again, through
# the page cache: the backend writes each block's first read into guest RAM
# (which a migration must carry: its dirty log), later reads come from that
# RAM. No readahead, and 8 blocks behind the writer, so that no read races
# a write of the same block.
echo 0 > /sys/block/vda/queue/read_ahead_kb
echo 0 > /tmp/last
(
    while :; do
        last=$(cat /tmp/last)
        j=1
        while [ $j -le $((last - 8)) ]; do
            got=$(dd if=/dev/vda bs=4096 skip=$j count=1 2>/dev/null | head -c 12)
            [ "$got" = "$(printf 'blk-%08d' $j)" ] || echo "VM-READ-MISMATCH n=$j got=$got"
            j=$((j + 1))
        done
        echo "VM-READ-PASS upto=$((j - 1))"
        sleep 0.2
    done
) &
i=0
while [ $i -lt 15000 ]; do
    i=$((i + 1))
    printf 'blk-%08d\n' $i | dd of=/dev/vda bs=4096 seek=$i conv=sync,fsync oflag=direct 2>/dev/null \
        && echo "VM-ACK n=$i" || echo "VM-WRITE-FAILED n=$i"
    echo $i > /tmp/last
    sleep 0.05
done
"#;

/// Runs on the test host.
fn host_script() -> String {
    format!(
        r#"#!/bin/sh
img=/tmp/vhost-disk.img
sock=/tmp/vhost-blk.sock
dd if=/dev/zero of=$img bs=1M count={DISK_MIB} 2>/dev/null
set -- $(dd if=$img bs=1M count={PATTERN_MIB} 2>/dev/null | md5sum); echo "VU-HOST-BEFORE md5=$1"
qemu-storage-daemon \
    --blockdev driver=file,node-name=file0,filename=$img \
    --blockdev driver=raw,node-name=disk0,file=file0 \
    --export type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path=$sock,writable=on \
    >/tmp/qsd.log 2>&1 &
qsd=$!
i=0
while [ ! -S $sock ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
[ -S $sock ] || {{ echo "qemu-storage-daemon did not listen"; cat /tmp/qsd.log; exit 1; }}
kiln-vmm --kernel /images/vmlinux --initrd /images/guest.cpio.gz --memory 256M \
    --disk vhost-user=$sock,id=vol0 --disk path=/images/vhost-user-script.img,ro=on \
    --cmdline "console=ttyS0 panic=-1 quiet kiln.script=/dev/vdb" </dev/null 2>/tmp/vu1.err
echo "VU-VMM-EXIT rc=$?"
sed 's/^/[vu1-err] /' /tmp/vu1.err
kill $qsd
wait $qsd
echo "VU-QSD-EXIT rc=$?"
sed 's/^/[qsd] /' /tmp/qsd.log
set -- $(dd if=$img bs=1M count={PATTERN_MIB} 2>/dev/null | md5sum); echo "VU-HOST-AFTER md5=$1"

# The backend dies under a running guest.
rm -f $sock
qemu-storage-daemon \
    --blockdev driver=file,node-name=file0,filename=$img \
    --blockdev driver=raw,node-name=disk0,file=file0 \
    --export type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path=$sock,writable=on \
    >/tmp/qsd2.log 2>&1 &
qsd=$!
i=0
while [ ! -S $sock ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
KILN_LOG=info kiln-vmm --kernel /images/vmlinux --initrd /images/guest.cpio.gz --memory 256M \
    --disk vhost-user=$sock --disk path=/images/vhost-user-kill.img,ro=on --serial file:/tmp/vu2.console \
    --cmdline "console=ttyS0 panic=-1 quiet kiln.script=/dev/vdb" </dev/null 2>/tmp/vu2.err &
vmm=$!
i=0
while ! grep -q VU2-WRITTEN /tmp/vu2.console 2>/dev/null && [ $i -lt 1200 ]; do sleep 0.1; i=$((i + 1)); done
kill $qsd
wait $qsd
echo "VU2-BACKEND-KILLED"
i=0
while kill -0 $vmm 2>/dev/null && [ $i -lt 1200 ]; do sleep 0.1; i=$((i + 1)); done
kill -0 $vmm 2>/dev/null && {{ echo VU2-VMM-HUNG; kill -9 $vmm; }}
wait $vmm
echo "VU2-VMM-EXIT rc=$?"
sed 's/^/[vu2-console] /' /tmp/vu2.console
sed 's/^/[vu2-err] /' /tmp/vu2.err

# kiln-store: a 2-replica volume on two daemons, exported by the writer (n1).
# Each daemon in its own directory, as on its own node: exports go beside
# the control socket (/run/nN/kiln-vhost-VOLUME.sock).
ks() {{ node=$1; shift; kiln-store volume "$@" --socket /run/$node/ks.sock; }}
kiln-store tls init --dir /tmp/ks-pki n1 n2 >/dev/null || echo "KS-TLS-INIT-FAILED"
for n in 1 2; do
    mkdir -p /tmp/ks-n$n /run/n$n
    kiln-store serve --node-id n$n --data /tmp/ks-n$n --listen 127.0.0.1:710$n \
        --tls-cert /tmp/ks-pki/n$n.crt --tls-key /tmp/ks-pki/n$n.key --tls-ca /tmp/ks-pki/ca.crt \
        --socket /run/n$n/ks.sock >/tmp/ks-n$n.log 2>&1 &
done
i=0
while {{ [ ! -S /run/n1/ks.sock ] || [ ! -S /run/n2/ks.sock ]; }} && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
ks n1 create vol1 --size {DISK_MIB}M --replica n1=127.0.0.1:7101 --replica n2=127.0.0.1:7102 \
    || echo "KS-CREATE-FAILED"
# kiln-vmm asks n1 to attach the volume and serve it over vhost-user.
kiln-vmm --kernel /images/vmlinux --initrd /images/guest.cpio.gz --memory 256M \
    --disk volume=vol1,store=/run/n1/ks.sock --disk path=/images/vhost-user-script.img,ro=on \
    --cmdline "console=ttyS0 panic=-1 quiet kiln.script=/dev/vdb" </dev/null 2>/tmp/ks-vm.err \
    | sed 's/^/[ks-vm] /'
echo "KS-VMM-EXIT rc=$?"
[ -S /run/n1/kiln-vhost-vol1.sock ] && echo "KS-EXPORT-SOCKET present"
sed 's/^/[ks-vm-err] /' /tmp/ks-vm.err
# n1's replica (the writer reads its own copy), then n2's: n2 takes over
# the volume (raising its epoch) and reads its own copy.
ks n1 export vol1 --to /tmp/ks-n1.img >/dev/null && \
    set -- $(dd if=/tmp/ks-n1.img bs=1M count={PATTERN_MIB} 2>/dev/null | md5sum) && echo "KS-N1 md5=$1"
rm -f /tmp/ks-n1.img
ks n1 detach vol1
ks n2 attach vol1 >/dev/null || echo "KS-N2-ATTACH-FAILED"
ks n2 export vol1 --to /tmp/ks-n2.img >/dev/null && \
    set -- $(dd if=/tmp/ks-n2.img bs=1M count={PATTERN_MIB} 2>/dev/null | md5sum) && echo "KS-N2 md5=$1"
ks n2 scrub vol1 >/dev/null && echo "KS-SCRUB ok" || echo "KS-SCRUB failed"
ks n2 --json show vol1 | tr -d '\n' | sed 's/^/KS-SHOW /'
echo

# A 2-queue volume on a 2-vCPU guest, resized while the guest runs.
ks n1 create vol2 --size {DISK_MIB}M --replica n1=127.0.0.1:7101 --replica n2=127.0.0.1:7102 \
    || echo "RS-CREATE-FAILED"
kiln-vmm --kernel /images/vmlinux --initrd /images/guest.cpio.gz --memory 256M --cpus 2 \
    --disk volume=vol2,store=/run/n1/ks.sock,queues=2 --disk path=/images/vhost-user-resize.img,ro=on \
    --serial file:/tmp/rs.console --cmdline "console=ttyS0 panic=-1 quiet kiln.script=/dev/vdb" \
    </dev/null 2>/tmp/rs.err &
vmm=$!
i=0
while ! grep -q RS-WAITING /tmp/rs.console 2>/dev/null && [ $i -lt 1200 ]; do sleep 0.1; i=$((i + 1)); done
ks n1 resize vol2 --size {RESIZED_MIB}M >/dev/null && echo RS-RESIZED || echo RS-RESIZE-FAILED
i=0
while kill -0 $vmm 2>/dev/null && [ $i -lt 1800 ]; do sleep 0.1; i=$((i + 1)); done
kill -0 $vmm 2>/dev/null && {{ echo RS-VMM-HUNG; kill -9 $vmm; }}
wait $vmm
echo "RS-VMM-EXIT rc=$?"
sed 's/^/[rs-console] /' /tmp/rs.console
sed 's/^/[rs-err] /' /tmp/rs.err

# A volume-backed guest migrated while it writes (VOLUME_WRITER_SCRIPT):
# every write it saw acknowledged must be on the volume afterwards.
# - SN: to a new kiln-vmm on the same node (an upgrade), over a unix
#   socket: guest RAM and the store's vhost-user connection are handed
#   over (the export serves one frontend at a time).
# - XN: to "another node" over TCP: the destination has n2 attach the
#   volume (raising its epoch) once the source is paused and its requests
#   completed; n1 is fenced and may not write after that.
mkdir -m 700 /run/kvm-mig
# acks FILE: the writes the guest saw acknowledged so far (0 without FILE).
acks() {{ c=$(grep -c VM-ACK "$1" 2>/dev/null); echo "${{c:-0}}"; }}
# reads FILE: the passes of the guest's reader so far.
reads() {{ c=$(grep -c VM-READ-PASS "$1" 2>/dev/null); echo "${{c:-0}}"; }}
# migrate TAG SOURCE_DISK DESTINATION_DISK ADDRESS: the disk options name
# the disk id=vol; image_TAG FILE writes the disk's bytes to FILE after;
# after_TAG (optional) runs once the source is gone.
migrate() {{
    tag=$1 sdisk=$2 ddisk=$3 addr=$4
    script="--disk path=/images/volume-writer.img,ro=on,id=script"
    KILN_LOG=info kiln-vmm --kernel /images/vmlinux --initrd /images/guest.cpio.gz --memory 128M \
        --disk $sdisk $script --api-socket /tmp/$tag-s.sock \
        --serial file:/tmp/$tag-s.console --cmdline "console=ttyS0 panic=-1 quiet kiln.script=/dev/vdb" \
        </dev/null 2>/tmp/$tag-s.err &
    src=$!
    KILN_LOG=info kiln-vmm --incoming $addr --memory 128M \
        --disk $ddisk $script --api-socket /tmp/$tag-d.sock \
        --serial file:/tmp/$tag-d.console </dev/null 2>/tmp/$tag-d.err &
    dst=$!
    i=0
    while [ "$(acks /tmp/$tag-s.console)" -lt 20 ] && [ $i -lt 3000 ]; do sleep 0.1; i=$((i + 1)); done
    kiln-api-call /tmp/$tag-s.sock PUT /vm/migrate "{{\"destination\":\"$addr\"}}" | sed "s/^/[$tag] /"
    i=0
    while kill -0 $src 2>/dev/null && [ $i -lt 1200 ]; do sleep 0.1; i=$((i + 1)); done
    kill -0 $src 2>/dev/null && {{ echo "$tag-SOURCE-STILL-RUNNING"; kiln-api-call /tmp/$tag-s.sock GET /vm; kill -9 $src; }}
    wait $src
    echo "$tag-SOURCE-EXIT rc=$?"
    grep -q 'done: downtime' /tmp/$tag-s.err || {{ echo "$tag-NOT-MIGRATED"; kill $dst; }}
    command -v after_$tag >/dev/null && after_$tag
    i=0
    while {{ [ "$(acks /tmp/$tag-d.console)" -lt 20 ] || [ "$(reads /tmp/$tag-d.console)" -lt 2 ]; }} \
        && [ $i -lt 1200 ]; do sleep 0.1; i=$((i + 1)); done
    kiln-api-call /tmp/$tag-d.sock PUT /vm/power-off | sed "s/^/[$tag] /"
    i=0
    while kill -0 $dst 2>/dev/null && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
    kill -0 $dst 2>/dev/null && {{ echo "$tag-DEST-HUNG"; kill -9 $dst; }}
    wait $dst
    echo "$tag-DEST-EXIT rc=$?"
    image_$tag /tmp/$tag.img || echo "$tag-IMAGE-FAILED"
    lost=0 checked=0
    for n in $(cat /tmp/$tag-s.console /tmp/$tag-d.console 2>/dev/null | grep -o 'VM-ACK n=[0-9]*' | cut -d= -f2); do
        got=$(dd if=/tmp/$tag.img bs=4096 skip=$n count=1 2>/dev/null | head -c 12)
        checked=$((checked + 1))
        [ "$got" = "$(printf 'blk-%08d' $n)" ] || {{ lost=$((lost + 1)); echo "$tag-LOST n=$n got=$got"; }}
    done
    rm -f /tmp/$tag.img
    failed=$(cat /tmp/$tag-s.console /tmp/$tag-d.console 2>/dev/null | grep -c VM-WRITE-FAILED)
    mismatched=$(cat /tmp/$tag-s.console /tmp/$tag-d.console 2>/dev/null | grep -c VM-READ-MISMATCH)
    cat /tmp/$tag-s.console /tmp/$tag-d.console 2>/dev/null | grep VM-READ-MISMATCH | head -5 | sed "s/^/[$tag] /"
    echo "$tag-VERIFIED checked=$checked lost=$lost src_acks=$(acks /tmp/$tag-s.console) dst_acks=$(acks /tmp/$tag-d.console) failed=$failed mismatched=$mismatched dst_reads=$(reads /tmp/$tag-d.console)"
    grep -h 'done: downtime' /tmp/$tag-s.err | sed "s/^/$tag-MIGRATION /"
    grep -v VM-ACK /tmp/$tag-s.err | sed "s/^/[$tag-s-err] /"
    sed "s/^/[$tag-d-err] /" /tmp/$tag-d.err
    # What the destination's guest said last, other than its writes.
    grep -v 'VM-ACK\|VM-READ-PASS' /tmp/$tag-d.console 2>/dev/null | tail -n 15 | sed "s/^/[$tag-d-console] /"
}}
volume() {{ ks $1 create $2 --size {DISK_MIB}M --replica n1=127.0.0.1:7101 --replica n2=127.0.0.1:7102 || echo "CREATE-FAILED $2"; }}
volume n1 vol4
image_SN() {{ ks n1 export vol4 --to "$1" >/dev/null 2>&1; }}
migrate SN volume=vol4,store=/run/n1/ks.sock,id=vol volume=vol4,store=/run/n1/ks.sock,id=vol unix:/run/kvm-mig/sn.sock
# cross_node TAG VOLUME PORT
cross_node() {{
    tag=$1 vol=$2 port=$3
    volume n1 $vol
    eval "image_$tag() {{ ks n2 export $vol --to \"\$1\" >/dev/null 2>&1; }}"
    eval "after_$tag() {{ old_writer $tag $vol; }}"
    migrate $tag volume=$vol,store=/run/n1/ks.sock,id=vol volume=$vol,store=/run/n2/ks.sock,id=vol tcp:127.0.0.1:$port
}}
# old_writer TAG VOLUME: the source's node may not write the volume any more.
old_writer() {{
    head -c 4096 /dev/urandom >/tmp/junk.img
    if ks n1 import $2 --from /tmp/junk.img >/tmp/$1-old.out 2>&1; then
        echo "$1-OLD-WRITER-WROTE"
    else
        echo "$1-OLD-WRITER-REFUSED $(tr '\n' ' ' </tmp/$1-old.out)"
    fi
}}
cross_node XN vol3 7300
# A guest that died of a triple fault (nested KVM: guests of QEMU die so
# too, and devices.rs and fio.rs rerun theirs the same way) moves once more
# in a fresh VM on a fresh volume.
if grep -q 'triple fault' /tmp/XN-s.err /tmp/XN-d.err; then
    echo "CASE-RETRY XN after a triple fault: $(grep -h 'triple fault' /tmp/XN-s.err /tmp/XN-d.err | head -1)"
    cross_node XN2 vol5 7301
fi
# qemu-storage-daemon (libvhost-user) on the same host: it knows the rings
# by their addresses in the frontend's memory, which the destination keeps.
dd if=/dev/zero of=/tmp/qn-disk.img bs=1M count={DISK_MIB} 2>/dev/null
rm -f /tmp/qn.sock
qemu-storage-daemon --blockdev driver=file,node-name=f0,filename=/tmp/qn-disk.img \
    --blockdev driver=raw,node-name=d0,file=f0 \
    --export type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path=/tmp/qn.sock,writable=on \
    >/tmp/qn-qsd.log 2>&1 &
qsd=$!
i=0
while [ ! -S /tmp/qn.sock ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
image_QN() {{ cp /tmp/qn-disk.img "$1"; }}
migrate QN vhost-user=/tmp/qn.sock,id=vol vhost-user=/tmp/qn.sock,id=vol unix:/run/kvm-mig/qn.sock
kill $qsd
wait $qsd
sed 's/^/[qn-qsd] /' /tmp/qn-qsd.log
sed 's/^/[ks-n1] /' /tmp/ks-n1.log
sed 's/^/[ks-n2] /' /tmp/ks-n2.log
"#
    )
}

/// The one test-host run every test reads. A failed run is kept too, so
/// that each test reports it rather than booting the test host again.
fn session() -> Option<&'static HostRun> {
    static RUN: OnceLock<Option<Result<HostRun, String>>> = OnceLock::new();
    RUN.get_or_init(|| {
        if !require_testhost() {
            return None;
        }
        let script_disk = target_dir().join("kiln-tests/vhost-user-script.img");
        std::fs::create_dir_all(script_disk.parent().unwrap()).unwrap();
        write_script_disk(&script_disk, &guest_script(), 4096).unwrap();
        let kill_disk = target_dir().join("kiln-tests/vhost-user-kill.img");
        write_script_disk(&kill_disk, KILLED_BACKEND_SCRIPT, 4096).unwrap();
        let resize_disk = target_dir().join("kiln-tests/vhost-user-resize.img");
        write_script_disk(&resize_disk, RESIZE_SCRIPT, 4096).unwrap();
        let writer_disk = target_dir().join("kiln-tests/volume-writer.img");
        write_script_disk(&writer_disk, VOLUME_WRITER_SCRIPT, 4096).unwrap();
        // Without nested paging, as fio.rs and devices.rs (`scripts/testhost
        // --help`, --no-npt).
        let run = TestHost::run_with_args(
            &host_script(),
            &[
                profile_binary("kiln-vmm"),
                profile_binary("kiln-store"),
                std::path::PathBuf::from(env!("CARGO_BIN_EXE_kiln-api-call")),
            ],
            &[
                (script_disk, "/images/vhost-user-script.img".into()),
                (kill_disk, "/images/vhost-user-kill.img".into()),
                (resize_disk, "/images/vhost-user-resize.img".into()),
                (writer_disk, "/images/volume-writer.img".into()),
            ],
            &["--no-npt".to_string()],
            // The script takes about 3 minutes.
            Duration::from_secs(600),
        );
        if let Ok(run) = &run {
            eprintln!("{}", run.output);
        }
        Some(run.map_err(|e| e.to_string()))
    })
    .as_ref()
    .map(|r| {
        let run = r.as_ref().unwrap_or_else(|e| panic!("test host: {e}"));
        run.assert_success();
        run
    })
}

fn value<'a>(run: &'a HostRun, marker: &str, key: &str) -> &'a str {
    let line = run
        .line_with(marker)
        .unwrap_or_else(|| panic!("no {marker} line in:\n{}", run.output));
    field(line, key).unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

#[test]
fn guest_data_written_through_vhost_user_lands_in_the_backend_image() {
    let Some(run) = session() else { return };
    assert!(run.line_with(GUEST_READY).is_some(), "{}", run.output);
    assert_eq!(value(run, GUEST_SCRIPT_EXIT, "rc"), "0", "{}", run.output);
    assert!(
        run.line_with("VU-GUEST-WRITE-FAILED").is_none(),
        "{}",
        run.output
    );
    assert_eq!(value(run, "VU-VMM-EXIT", "rc"), "0", "{}", run.output);

    let wrote = value(run, "VU-GUEST-WROTE", "md5");
    let read = value(run, "VU-GUEST-READBACK", "md5");
    let before = value(run, "VU-HOST-BEFORE", "md5");
    let after = value(run, "VU-HOST-AFTER", "md5");
    assert_eq!(wrote.len(), 32, "{wrote}");
    // The image changed, to exactly what the guest wrote and read back.
    assert_ne!(before, after);
    assert_eq!(read, wrote);
    assert_eq!(after, wrote);
}

#[test]
fn guest_sees_the_capacity_the_backend_reports() {
    let Some(run) = session() else { return };
    assert_eq!(
        value(run, "VU-GUEST-CAPACITY", "sectors"),
        (DISK_MIB << 11).to_string(),
        "{}",
        run.output
    );
}

#[test]
fn daemon_and_vmm_stop_cleanly() {
    let Some(run) = session() else { return };
    assert_eq!(value(run, "VU-VMM-EXIT", "rc"), "0", "{}", run.output);
    // kill's SIGTERM: qemu-storage-daemon exits 0 on it.
    assert_eq!(value(run, "VU-QSD-EXIT", "rc"), "0", "{}", run.output);
    // Nothing went wrong enough for kiln-vmm to warn about it.
    assert_eq!(
        run.lines_with("[vu1-err]"),
        Vec::<&str>::new(),
        "{}",
        run.output
    );
}

#[test]
fn a_backend_that_dies_is_logged_and_the_vmm_keeps_running() {
    let Some(run) = session() else { return };
    let out = &run.output;
    assert!(
        run.line_with("[vu2-console] VU2-WRITTEN").is_some(),
        "{out}"
    );
    assert!(run.line_with("VU2-BACKEND-KILLED").is_some(), "{out}");
    assert!(
        out.lines().any(|l| l.starts_with("[vu2-err]")
            && l.contains("ERROR the vhost-user backend disconnected")),
        "{out}"
    );
    // The guest went on running after the backend died, and its read of
    // the dead backend's disk never completed.
    assert!(
        run.line_with("[vu2-console] VU2-GIVING-UP").is_some(),
        "{out}"
    );
    assert!(run.line_with("VU2-READ-DONE").is_none(), "{out}");
    assert!(run.line_with("VU2-VMM-HUNG").is_none(), "{out}");
    assert_eq!(value(run, "VU2-VMM-EXIT", "rc"), "0", "{out}");
}

/// The `md5=` of a `[ks-vm] MARKER md5=...` console line of the store guest.
fn store_guest_md5<'a>(run: &'a HostRun, marker: &str) -> &'a str {
    let line = run
        .output
        .lines()
        .find(|l| l.starts_with("[ks-vm]") && l.contains(marker))
        .unwrap_or_else(|| panic!("no [ks-vm] {marker} line in:\n{}", run.output));
    field(line, "md5").unwrap_or_else(|| panic!("no md5= in {line:?}"))
}

#[test]
fn a_guest_writes_to_a_two_replica_kiln_store_volume_and_both_replicas_hold_it() {
    let Some(run) = session() else { return };
    let out = &run.output;
    for failure in [
        "KS-TLS-INIT-FAILED",
        "KS-CREATE-FAILED",
        "KS-N2-ATTACH-FAILED",
    ] {
        assert!(run.line_with(failure).is_none(), "{failure}:\n{out}");
    }
    assert_eq!(value(run, "KS-VMM-EXIT", "rc"), "0", "{out}");
    // kiln-vmm had n1 export the volume beside n1's control socket.
    assert!(run.line_with("KS-EXPORT-SOCKET present").is_some(), "{out}");
    assert!(
        out.lines().any(|l| l.starts_with("[ks-vm]")
            && l.contains("VU-GUEST-CAPACITY")
            && l.contains(&format!("sectors={}", DISK_MIB << 11))),
        "the guest sees the volume's size:\n{out}"
    );
    let wrote = store_guest_md5(run, "VU-GUEST-WROTE");
    assert_eq!(wrote.len(), 32, "{wrote}");
    assert_eq!(store_guest_md5(run, "VU-GUEST-READBACK"), wrote, "{out}");
    // Each node's own copy holds exactly what the guest wrote.
    assert_eq!(value(run, "KS-N1", "md5"), wrote, "replica on n1:\n{out}");
    assert_eq!(value(run, "KS-N2", "md5"), wrote, "replica on n2:\n{out}");
    assert!(run.line_with("KS-SCRUB ok").is_some(), "{out}");
}

/// `kiln-store volume resize` under a running guest whose volume disk has
/// two queues: the guest had two hardware queues, saw the new size without
/// a restart, and wrote and read back a block past the old end.
#[test]
fn a_resized_volume_shows_its_new_size_to_the_running_guest() {
    let Some(run) = session() else { return };
    let out = &run.output;
    for failure in ["RS-CREATE-FAILED", "RS-RESIZE-FAILED", "RS-VMM-HUNG"] {
        assert!(run.line_with(failure).is_none(), "{failure}:\n{out}");
    }
    assert!(run.line_with("RS-RESIZED").is_some(), "{out}");
    assert_eq!(value(run, "RS-VMM-EXIT", "rc"), "0", "{out}");
    let before = value(run, "[rs-console] RS-BEFORE", "sectors");
    assert_eq!(before, (DISK_MIB << 11).to_string(), "{out}");
    assert_eq!(value(run, "[rs-console] RS-BEFORE", "queues"), "2", "{out}");
    assert_eq!(
        value(run, "[rs-console] RS-AFTER", "sectors"),
        (RESIZED_MIB << 11).to_string(),
        "the guest never saw the new size:\n{out}"
    );
    assert!(
        run.line_with("[rs-console] RS-WROTE-PAST-OLD-END")
            .is_some(),
        "{out}"
    );
    assert!(
        run.line_with("[rs-console] RS-READBACK-SAME").is_some(),
        "{out}"
    );
}

/// A volume-backed guest migrated while writing (case `tag` of the host
/// script): both kiln-vmm exit 0, the guest wrote on both sides, and every
/// write it saw acknowledged is on the volume.
fn migrated_while_writing(run: &HostRun, tag: &str) {
    let m = |what: &str| format!("{tag}-{what}");
    assert_eq!(value(run, &m("SOURCE-EXIT"), "rc"), "0", "{}", run.output);
    assert_eq!(value(run, &m("DEST-EXIT"), "rc"), "0", "{}", run.output);
    let acks = |side: &str| -> u32 { value(run, &m("VERIFIED"), side).parse().unwrap() };
    assert!(
        acks("src_acks") >= 20 && acks("dst_acks") >= 20,
        "{}",
        run.output
    );
    assert_eq!(value(run, &m("VERIFIED"), "lost"), "0", "{}", run.output);
    assert_eq!(value(run, &m("VERIFIED"), "failed"), "0", "{}", run.output);
    // What the guest read before or during the move and reads again from
    // its page cache afterwards is what it wrote.
    assert_eq!(
        value(run, &m("VERIFIED"), "mismatched"),
        "0",
        "{}",
        run.output
    );
    let reads: u32 = value(run, &m("VERIFIED"), "dst_reads").parse().unwrap();
    assert!(reads >= 2, "{}", run.output);
    let migration = run
        .line_with(&m("MIGRATION"))
        .unwrap_or_else(|| panic!("{}", run.output));
    eprintln!("{migration}");
}

#[test]
fn a_volume_backed_guest_moves_to_a_new_kiln_vmm_on_its_node_keeping_every_acknowledged_write() {
    let Some(run) = session() else { return };
    migrated_while_writing(run, "SN");
    // Guest RAM and the store's connection were handed over, not copied
    // or connected to anew.
    assert!(
        run.line_with("SN-MIGRATION")
            .is_some_and(|l| l.contains("MemoryHandedOver")),
        "{}",
        run.output
    );
    assert!(
        run.output
            .contains("disk vol: taking over the source's connection"),
        "{}",
        run.output
    );
}

#[test]
fn a_guest_on_qemu_storage_daemon_moves_to_a_new_kiln_vmm_on_its_host() {
    let Some(run) = session() else { return };
    migrated_while_writing(run, "QN");
    assert!(
        run.line_with("QN-MIGRATION")
            .is_some_and(|l| l.contains("MemoryHandedOver")),
        "{}",
        run.output
    );
}

#[test]
fn a_volume_backed_guest_moves_to_another_node_which_fences_the_old_writer() {
    let Some(run) = session() else { return };
    // The case, or its rerun after the guest died of a triple fault (which
    // is counted as a retry and said in CI's log).
    let tag = match run.line_with("CASE-RETRY XN ") {
        None => "XN",
        Some(why) => {
            kiln_tests::retry(format!(
                "the cross-node migration case XN ran once more in a fresh VM: {why}"
            ));
            "XN2"
        }
    };
    migrated_while_writing(run, tag);
    let refused = run
        .line_with(&format!("{tag}-OLD-WRITER-REFUSED"))
        .unwrap_or_else(|| panic!("the old writer wrote after the handover:\n{}", run.output));
    assert!(refused.contains("fenced"), "{refused}");
    // kiln-store logged the pages it wrote into guest RAM (the guest's
    // reads) during the pre-copy: guest RAM did not go again while paused.
    assert!(
        run.output
            .contains("the vhost-user backends log their writes to guest RAM"),
        "{}",
        run.output
    );
    assert!(
        !run.output.contains("resending all guest RAM while paused"),
        "{}",
        run.output
    );
    // The destination attached the volume (fencing the source) only when
    // it started the VM, after the source had committed: not while
    // restoring, when the source could still have resumed.
    let dest: Vec<&str> = run
        .output
        .lines()
        .filter(|l| l.starts_with(&format!("[{tag}-d-err]")))
        .collect();
    let at = |what: &str| {
        dest.iter()
            .position(|l| l.contains(what))
            .unwrap_or_else(|| panic!("no {what:?} from the destination:\n{}", run.output))
    };
    assert!(
        at("restored 1 vCPU(s)") < at("kiln-store serves the volume"),
        "{}",
        run.output
    );
}
