#!/usr/bin/bash
# dracut module: persistence for live USB sticks booted with dmsquash-live
# (root=live:CDLABEL=...). Runs `mados-persistence boot` at pre-pivot, once
# the live root is assembled at $NEWROOT.

# Included only when asked for (dracut --add mados-persistence), and only
# if its programs are there.
check() {
    require_binaries mados-persistence mke2fs e2fsck || return 1
    return 255
}

depends() {
    echo dmsquash-live
    return 0
}

installkernel() {
    instmods ext4 overlay loop crc32c usb-storage uas sd_mod xhci_pci xhci_hcd ehci_pci ehci_hcd
}

install() {
    # at /usr/bin in the initramfs wherever it is installed on the build host
    inst_binary "$(command -v mados-persistence)" /usr/bin/mados-persistence
    inst_multiple mke2fs e2fsck
    # shellcheck disable=SC2154 # moddir is set by dracut
    inst_hook pre-pivot 50 "$moddir/mados-persistence-hook.sh"
}
