#!/usr/bin/env bash
# Build the VM test guest from Debian packages only: the kernel of linux-image-amd64
# and an initramfs of busybox-static that serves the counter interface of
# shared/design/GUESTS.md on port 80 (guests/vm/init and guests/vm/counter).
#
#   scripts/build-vm-guest.sh [OUT_DIR]     (default: target/vm-guest)
#
# Writes OUT_DIR/vmlinuz and OUT_DIR/initrd.img (gzip'd cpio). A second run with both
# present and the same inputs does nothing (OUT_DIR/stamp names what they were built
# from). Needs apt-get (packages are downloaded, never installed) and dpkg-deb.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$here/target/vm-guest}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

kernel_of() {
    apt-cache depends linux-image-amd64 2>/dev/null |
        awk '!k && /Depends: linux-image-[0-9]/ {k = $2} END {print k}'
}
kernel_pkg="$(kernel_of)"
if [ -z "$kernel_pkg" ] && [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    kernel_pkg="$(kernel_of)"
fi
if [ -z "$kernel_pkg" ]; then
    echo "build-vm-guest: no linux-image package known to apt (run apt-get update)" >&2
    exit 1
fi
busybox_ver="$(apt-cache policy busybox-static | awk '/Candidate:/ {print $2}')"
stamp="$kernel_pkg busybox-static=$busybox_ver $(cat "$0" "$here/guests/vm/init" "$here/guests/vm/counter" | sha256sum | cut -c1-16)"
if [ -f "$out/vmlinuz" ] && [ -f "$out/initrd.img" ] && [ "$(cat "$out/stamp" 2>/dev/null)" = "$stamp" ]; then
    echo "build-vm-guest: $out is up to date ($stamp)"
    exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
# apt-get download writes into the current directory; _apt cannot read /root dirs.
chmod 755 "$work"
apt-get download -q -o APT::Sandbox::User=root "$kernel_pkg" busybox-static >/dev/null
dpkg-deb -x linux-image-*.deb kernel
dpkg-deb -x busybox-static_*.deb busybox
release="$(ls kernel/lib/modules)"

root="$work/root"
mkdir -p "$root"/{bin,dev,proc,sys,run,etc/acpi,lib/modules}
cp busybox/bin/busybox "$root/bin/busybox"
install -m 755 "$here/guests/vm/init" "$root/init"
install -m 755 "$here/guests/vm/counter" "$root/bin/counter"
# virtio-net on PCI and the ACPI button, with what they need, in the order they
# depend on each other (each module names its dependencies in `depends=`).
moddir="kernel/lib/modules/$release"
order=""
add_module() {
    local m="$1" f deps d
    case " $order " in *" $m "*) return ;; esac
    f="$(find "$moddir" -name "$m.ko" | awk 'NR == 1')"
    if [ -z "$f" ]; then
        echo "build-vm-guest: module $m not in $kernel_pkg" >&2
        exit 1
    fi
    deps="$(grep -a -o 'depends=[a-z0-9_,-]*' "$f" | awk -F= 'NR == 1 {print $2}' | tr ',' ' ' || true)"
    for d in $deps; do add_module "$d"; done
    order="$order $m"
    cp "$f" "$root/lib/modules/$m.ko"
}
for m in virtio_pci virtio_net button evdev; do add_module "$m"; done
order="${order# }"
echo "$order" > "$root/lib/modules/order"
# busybox acpid: the power button event runs /etc/acpi/power.
echo "PWRF power" > "$root/etc/acpid.conf"
printf '#!/bin/sh\necho "avail-vm-guest: power button, powering off"\npoweroff -f\n' > "$root/etc/acpi/power"
chmod 755 "$root/etc/acpi/power"

(cd "$root" && find . | "$root/bin/busybox" cpio -o -H newc 2>/dev/null) | gzip -9 > "$out/initrd.img.new"
cp "kernel/boot/vmlinuz-$release" "$out/vmlinuz.new"
mv "$out/initrd.img.new" "$out/initrd.img"
mv "$out/vmlinuz.new" "$out/vmlinuz"
echo "$stamp" > "$out/stamp"
echo "build-vm-guest: $out/vmlinuz ($release), $out/initrd.img ($(du -k "$out/initrd.img" | cut -f1) KiB)"
