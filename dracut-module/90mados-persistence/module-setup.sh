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

# Encrypted persistence: cryptsetup and dm_crypt only when the builder
# enables it (`encrypt = true`, a top-level key of the ISO's
# /etc/mados/persistence.toml, or MADOS_PERSISTENCE_ENCRYPT=1).
mados_encrypt() {
    local conf=${MADOS_PERSISTENCE_CONFIG:-/etc/mados/persistence.toml}
    [[ ${MADOS_PERSISTENCE_ENCRYPT:-} == 1 ]] && return 0
    [[ -r $conf ]] || return 1
    awk '/^[[:space:]]*\[/ { exit }
        /^[[:space:]]*encrypt[[:space:]]*=[[:space:]]*true[[:space:]]*(#.*)?$/ { found = 1; exit }
        END { exit !found }' "$conf"
}

installkernel() {
    instmods ext4 overlay loop crc32c usb-storage uas sd_mod xhci_pci xhci_hcd ehci_pci ehci_hcd
    if mados_encrypt; then
        # as dracut's own crypt module: the target and the crypto modules
        instmods dm_mod dm_crypt =crypto
    fi
}

install() {
    # at /usr/bin in the initramfs wherever it is installed on the build host
    inst_binary "$(command -v mados-persistence)" /usr/bin/mados-persistence
    inst_multiple mke2fs e2fsck
    if mados_encrypt; then
        inst_multiple cryptsetup
    fi
    # shellcheck disable=SC2154 # moddir is set by dracut
    inst_hook pre-pivot 50 "$moddir/mados-persistence-hook.sh"
}
