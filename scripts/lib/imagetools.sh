# shellcheck shell=bash
# Helpers shared by images/build and scripts/testhost for assembling initramfs
# trees. Source it; it defines functions only.
#
# Image layout convention: both initramfs images use a merged-/usr layout
# (bin -> usr/bin, sbin -> usr/sbin, lib -> usr/lib, lib64 -> usr/lib64), so any
# path that ldd prints (/lib/..., /usr/lib/..., /lib64/...) resolves inside the
# image. Files are always *staged* under their canonical usr/ path, because an
# archive appended later (the per-run cpio) must create files through real
# directories, not through the symlinks.

# Print a progress line on stderr.
say() { printf '%s: %s\n' "${KILN_TOOL:-kiln}" "$*" >&2; }
die() { printf '%s: error: %s\n' "${KILN_TOOL:-kiln}" "$*" >&2; exit 1; }

# canon_path /lib/x86_64-linux-gnu/libz.so.1 -> usr/lib/x86_64-linux-gnu/libz.so.1
# (relative, without the leading slash, with /bin /sbin /lib /lib64 folded into usr/).
canon_path() {
    local p=${1#/}
    case $p in
        usr/*) ;;
        bin/* | sbin/* | lib/* | lib64/*) p=usr/$p ;;
    esac
    printf '%s\n' "$p"
}

# make_root DIR: create the skeleton of a merged-/usr root in DIR.
make_root() {
    local r=$1
    mkdir -p "$r"/usr/bin "$r"/usr/sbin "$r"/usr/lib "$r"/usr/lib64 \
        "$r"/dev "$r"/proc "$r"/sys "$r"/tmp "$r"/run "$r"/etc "$r"/root "$r"/mnt
    chmod 1777 "$r"/tmp
    ln -sfn usr/bin "$r"/bin
    ln -sfn usr/sbin "$r"/sbin
    ln -sfn usr/lib "$r"/lib
    ln -sfn usr/lib64 "$r"/lib64
}

# install_busybox ROOT: the static busybox plus one symlink per applet.
install_busybox() {
    local r=$1 applet
    [[ -x /usr/bin/busybox ]] || die "/usr/bin/busybox missing (apt-get install busybox-static)"
    # Debian's busybox-static really is static; a dynamic one would need its libs.
    if ldd /usr/bin/busybox >/dev/null 2>&1; then
        die "/usr/bin/busybox is dynamically linked; install busybox-static"
    fi
    install -m 0755 /usr/bin/busybox "$r"/usr/bin/busybox
    # Creating the applet links here (rather than `busybox --install` in /init)
    # keeps the guest's init fast.
    while read -r applet; do
        applet=$(canon_path "$applet")
        [[ -e $r/$applet || -L $r/$applet ]] && continue
        mkdir -p "$r/$(dirname "$applet")"
        ln -s /usr/bin/busybox "$r/$applet"
    done < <(/usr/bin/busybox --list-full)
}

# shared_libs FILE: print the absolute paths of FILE's shared libraries
# (including the dynamic loader), one per line; nothing for a static binary.
shared_libs() {
    local f=$1 out
    # ldd exits non-zero for static binaries ("not a dynamic executable").
    out=$(ldd "$f" 2>&1) || return 0
    if grep -q 'not found' <<<"$out"; then
        die "$f: unresolved shared libraries: $(grep 'not found' <<<"$out" | tr -s ' \t' ' ')"
    fi
    awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i }' <<<"$out"
}

# install_libs ROOT FILE [SKIPLIST]: copy FILE's shared libraries into ROOT at
# their canonical paths (following symlinks: the file lands under the soname
# that the loader asks for). Libraries named in SKIPLIST (a file of canonical
# paths, e.g. the base image's file list) are not copied again.
install_libs() {
    local r=$1 f=$2 skip=${3:-} lib dest
    while read -r lib; do
        [[ -n $lib ]] || continue
        dest=$(canon_path "$lib")
        [[ -e $r/$dest ]] && continue
        if [[ -n $skip ]] && grep -qxF "$dest" "$skip"; then continue; fi
        mkdir -p "$r/$(dirname "$dest")"
        cp -L "$lib" "$r/$dest"
    done < <(shared_libs "$f")
}

# resolve_modules MODDIR NAME...: print the .ko paths (relative to MODDIR, from
# MODDIR/modules.dep) needed to load the named modules, dependencies first,
# each once. NAME is a module name as in modules.dep ("kvm-amd", "virtio_net").
resolve_modules() {
    local dir=$1
    shift
    awk -v want="$*" '
        function base(p,   b) { b = p; sub(/.*\//, "", b); sub(/\.ko(\.[a-z]+)?$/, "", b); return b }
        function visit(p,   n, i, d) {
            if (p in seen) return
            seen[p] = 1
            n = split(deps[p], d, " ")
            # modules.dep lists the dependencies of a module so that the last
            # one must be loaded first (modprobe loads them in reverse).
            for (i = n; i >= 1; i--) visit(d[i])
            print p
        }
        {
            p = $1; sub(/:$/, "", p)
            deps[p] = ""
            for (i = 2; i <= NF; i++) deps[p] = deps[p] " " $i
            byname[base(p)] = p
            # modules.dep uses file names; "-" and "_" are interchangeable in names.
            alt = base(p); gsub(/-/, "_", alt); byname[alt] = p
        }
        END {
            n = split(want, w, " ")
            for (i = 1; i <= n; i++) {
                k = w[i]; if (!(k in byname)) { gsub(/-/, "_", k) }
                if (!(k in byname)) { print "resolve_modules: no module " w[i] > "/dev/stderr"; exit 1 }
                visit(byname[k])
            }
        }' "$dir/modules.dep"
}

# install_modules ROOT KVER MODDIR LISTFILE: copy the modules named in LISTFILE
# (paths relative to MODDIR) into ROOT/usr/lib/modules/KVER and run depmod there,
# so that busybox `modprobe NAME` (and the kernel's request_module) work for them.
install_modules() {
    local r=$1 kver=$2 src=$3 list=$4 m dst
    dst=$r/usr/lib/modules/$kver
    mkdir -p "$dst"
    while read -r m; do
        mkdir -p "$dst/$(dirname "$m")"
        cp "$src/$m" "$dst/$m"
    done <"$list"
    # depmod wants these; modules.order only needs the shipped modules.
    grep -xF -f "$list" "$src"/modules.order >"$dst"/modules.order || :
    cp "$src"/modules.builtin "$src"/modules.builtin.modinfo "$dst"/
    depmod -b "$r/usr" "$kver"
    # busybox modprobe reads the text files only.
    rm -f "$dst"/*.bin "$dst"/modules.builtin.modinfo
}

# cpio_newc_node NAME MODE RDEVMAJOR RDEVMINOR: write one newc cpio entry with no
# data (a device node or directory) to stdout. Used so that device nodes such as
# /dev/console can be put into an archive without being root.
cpio_newc_node() {
    local name=$1 mode=$2 maj=$3 min=$4 namesize hdr pad
    namesize=$((${#name} + 1))
    #        magic ino  mode uid  gid  nlink mtime size dmaj dmin rmaj rmin nsize check
    hdr=$(printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
        0 "$mode" 0 0 1 0 0 0 0 "$maj" "$min" "$namesize" 0)
    printf '%s%s\0' "$hdr" "$name"
    # Header (110 bytes) + name is padded to a multiple of 4.
    pad=$(((4 - (110 + namesize) % 4) % 4))
    head -c "$pad" /dev/zero
}

# cpio_from_dir DIR OUT: archive DIR's contents (not DIR itself) in newc format,
# owned by root, in a stable order; with /dev/console appended.
cpio_from_dir() {
    local dir=$1 out=$2
    (
        cd "$dir" || exit 1
        find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort |
            cpio --quiet -o -H newc -R 0:0
    ) >"$out"
    # A second archive with the console device (char 5:1); the kernel opens it
    # for init's stdio before init can mount devtmpfs. Linux unpacks
    # concatenated archives in order.
    {
        cpio_newc_node dev $((8#040755)) 0 0
        cpio_newc_node dev/console $((8#020600)) 5 1
        cpio_newc_node TRAILER!!! 0 0 0
        # pad to 512 bytes like GNU cpio does, so appended archives stay aligned
    } >"$out.dev"
    local sz
    sz=$(stat -c %s "$out.dev")
    head -c $(((512 - sz % 512) % 512)) /dev/zero >>"$out.dev"
    cat "$out.dev" >>"$out"
    rm -f "$out.dev"
}
