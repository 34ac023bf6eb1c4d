# Shared by qemu/demo and qemu/scenarios: build the test kernel, initramfs,
# live root and ISO, and boot virtual machines. Source it; needs root for
# nothing but is run as root in CI.
# shellcheck shell=bash

set -euo pipefail
QEMU_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$QEMU_DIR")
WORK=${MADOS_QEMU_WORK:-$QEMU_DIR/work}
ISO_LABEL=MADOS_TEST
mkdir -p "$WORK"

log() { printf '\033[1m[qemu]\033[0m %s\n' "$*" >&2; }

# Debian packages the QEMU tests need; installed when missing (as root).
QEMU_PACKAGES=(qemu-system-x86 linux-image-amd64 busybox-static xorriso isolinux syslinux-common
	squashfs-tools mtools dosfstools cpio e2fsprogs fdisk grub-pc-bin grub-efi-amd64-bin grub-common ovmf
	dracut-core dracut-live cryptsetup-bin)

ensure_packages() {
	local missing=()
	for p in "${QEMU_PACKAGES[@]}"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
	done
	if ((${#missing[@]})); then
		log "installing ${missing[*]}"
		if [[ $(id -u) != 0 ]]; then
			echo "qemu: needs these Debian packages: ${missing[*]} (run as root to install them)" >&2
			return 1
		fi
		apt-get update -qq
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
	fi
}

kernel_version() {
	local v
	v=$(find /boot -maxdepth 1 -name 'vmlinuz-*-amd64' -printf '%f\n' | sed 's/^vmlinuz-//' | sort -V | tail -n1)
	[[ -n $v ]] || { echo "qemu: no Debian amd64 kernel in /boot (apt-get install linux-image-amd64)" >&2; return 1; }
	echo "$v"
}

# Where cargo puts the release build (CARGO_TARGET_DIR is honoured).
RELEASE=${CARGO_TARGET_DIR:-$REPO/target}/x86_64-unknown-linux-gnu/release
BIN=$RELEASE/mados-persistence
# MADOS_PKG_ROOT: a root the Arch package was installed into
# (packaging/arch/check; tests/run sets it): then what is booted is what
# users install -- the package's binary, mkinitcpio hooks, dracut module
# and units -- else the build's binary and the repo's files.
# shellcheck disable=SC2034 # INITCPIO_DIR: qemu/real-archiso; UNIT_DIR: for a live root with systemd
INITCPIO_DIR=$REPO/mkinitcpio-hook DRACUT_MODULE=$REPO/dracut-module/90mados-persistence UNIT_DIR=$REPO/systemd
SHUTDOWN_HOOK=$REPO/systemd/mados-persistence.shutdown CONFIG_FILE=$REPO/config/persistence.toml
# shellcheck disable=SC2034
if [[ -n ${MADOS_PKG_ROOT:-} ]]; then
	BIN=$MADOS_PKG_ROOT/usr/bin/mados-persistence
	INITCPIO_DIR=$MADOS_PKG_ROOT/usr/lib/initcpio
	DRACUT_MODULE=$MADOS_PKG_ROOT/usr/lib/dracut/modules.d/90mados-persistence
	UNIT_DIR=$MADOS_PKG_ROOT/usr/lib/systemd/system
	SHUTDOWN_HOOK=$MADOS_PKG_ROOT/usr/lib/systemd/system-shutdown/mados-persistence.shutdown
	CONFIG_FILE=$MADOS_PKG_ROOT/etc/mados/persistence.toml
fi

# build_binary: build everything the demo, the scenarios, bench/* and
# qemu/real-archiso copy into an image -- the binary itself, the test tool
# (and with BENCH=1 the fanotify probe) -- in one cargo call, then check
# that what is booted is the static binary just built.
build_binary() {
	log "building mados-persistence (static, release)"
	local examples=(--example tierbench)
	if [[ -n ${BENCH:-} ]]; then examples+=(--example fanprobe); fi
	(cd "$REPO" && cargo build --release --quiet --bin mados-persistence "${examples[@]}")
	[[ -z ${MADOS_PKG_ROOT:-} ]] || log "booting the package's files from $MADOS_PKG_ROOT"
	[[ -x $BIN ]] || { echo "qemu: no $BIN" >&2; return 1; }
	file "$BIN" | grep -Eq 'static(-pie)? linked|statically linked' || { echo "qemu: $BIN is not static" >&2; return 1; }
}

# Copy a module and its dependencies; append them to modules.order in load order.
add_module() {
	local root=$1 kv=$2 m=$3 f dep
	f=$(modinfo -k "$kv" -F filename "$m" 2>/dev/null) || { echo "qemu: module $m not found" >&2; return 1; }
	[[ $f == "(builtin)" ]] && return 0
	grep -qxF "$f" "$root/modules.order" 2>/dev/null && return 0
	for dep in $(modinfo -k "$kv" -F depends "$m" | tr ',' ' '); do
		add_module "$root" "$kv" "$dep"
	done
	mkdir -p "$root/$(dirname "${f#/}")"
	cp "$f" "$root/${f#/}"
	echo "$f" >>"$root/modules.order"
}

# Dynamic programs and the libraries they need.
add_program() {
	local root=$1 prog=$2 lib
	mkdir -p "$root/$(dirname "${prog#/}")"
	cp -L "$prog" "$root/${prog#/}"
	for lib in $(ldd "$prog" | grep -o '/[^ ]*'); do
		mkdir -p "$root/$(dirname "${lib#/}")"
		cp -L "$lib" "$root/${lib#/}"
	done
}

busybox_tree() {
	local root=$1 a
	mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,run,tmp,etc}
	cp /bin/busybox "$root/bin/busybox"
	for a in $(/bin/busybox --list); do
		[[ -e $root/bin/$a ]] || ln -s busybox "$root/bin/$a"
	done
}

build_initramfs() {
	local kv root
	kv=$(kernel_version)
	root=$WORK/initramfs
	rm -rf "$root"
	busybox_tree "$root"
	: >"$root/modules.order"
	for m in xhci_pci xhci_hcd usb_storage uas sd_mod sr_mod cdrom isofs squashfs loop ext4 overlay \
		ata_piix ata_generic virtio_pci virtio_blk crc32c_generic \
		dm_mod dm_crypt xts ecb algif_skcipher; do
		add_module "$root" "$kv" "$m"
	done
	add_program "$root" /usr/sbin/mke2fs
	add_program "$root" /usr/sbin/e2fsck
	# encrypted persistence (scenario w): what a builder's initramfs
	# carries when it enables encryption (README "Encrypted persistence")
	add_program "$root" /usr/sbin/cryptsetup
	cp "$BIN" "$root/usr/bin/mados-persistence"
	cp "$QEMU_DIR/initramfs-init" "$root/init"
	chmod +x "$root/init"
	# the shutdown initramfs (mkinitcpio's shutdown hook): /shutdown and
	# util-linux's umount (--recursive), beside busybox's
	cp "$QEMU_DIR/initramfs-shutdown" "$root/shutdown"
	chmod +x "$root/shutdown"
	add_program "$root" /usr/bin/umount
	(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) >"$WORK/initramfs.img"
	cp "/boot/vmlinuz-$kv" "$WORK/vmlinuz"
}

build_liveroot() {
	local root=$WORK/liveroot
	rm -rf "$root"
	busybox_tree "$root"
	mkdir -p "$root"/{etc,usr/share/madOS,var/log,var/cache,var/tmp,opt,home/live,root,mnt}
	echo "madOS test live system" >"$root/usr/share/madOS/release"
	echo "madOS" >"$root/etc/hostname"
	echo "welcome home" >"$root/home/live/.profile"
	cp "$BIN" "$root/usr/bin/mados-persistence"
	# the test tool: page-cache residency (scenario v), write patterns (bench)
	cp "$RELEASE/examples/tierbench" "$root/usr/bin/tierbench"
	# a real live system has e2fsprogs (iso-profile/packages.x86_64): enable needs it
	add_program "$root" /usr/sbin/mke2fs
	add_program "$root" /usr/sbin/e2fsck
	# enable --encrypt in the session (scenario w)
	add_program "$root" /usr/sbin/cryptsetup
	# bench/run (BENCH=1): the write-pattern tool, the fanotify probe and
	# rsync, the peers' copier
	if [[ -n ${BENCH:-} ]]; then
		cp "$RELEASE/examples/fanprobe" "$root/usr/bin/fanprobe"
		add_program "$root" "$(command -v rsync)"
		if command -v vmtouch >/dev/null; then add_program "$root" "$(command -v vmtouch)"; fi
	fi
	# scenario t: files in the squashfs the hot set reads ahead, and one it does not
	mkdir -p "$root/usr/share/hotsq" "$root/usr/share/coldsq"
	for f in hotsq/s1 hotsq/s2 coldsq/c1; do
		head -c 1048576 /dev/urandom >"$root/usr/share/$f"
	done
	# the booted kernel's modules, as a real image carries them (scenario
	# x): a few, with depmod's index; `dummy` is not in the initramfs, so
	# `modprobe dummy` proves the live system reads them. /lib/modules is
	# /usr/lib/modules, as on a usr-merged system.
	local kv f
	kv=$(kernel_version)
	f=$(modinfo -k "$kv" -F filename dummy)
	install -D -m 644 "$f" "$root/usr/lib/modules/$kv/${f#*/modules/"$kv"/}"
	depmod -b "$root/usr" "$kv"
	mkdir -p "$root/lib"
	ln -sfn ../usr/lib/modules "$root/lib/modules"
	cp "$QEMU_DIR/live-init" "$root/sbin/init"
	chmod +x "$root/sbin/init"
	rm -f "$WORK/airootfs.sfs"
	mksquashfs "$root" "$WORK/airootfs.sfs" -quiet -noappend -comp gzip >/dev/null
}

# Kernel parameters the test ISO's own boot menus pass (after the
# product's own): serial console, and the live system checks what persisted.
BOOTMENU_EXTRA="console=ttyS0 panic=-1 no_timer_check loglevel=4 madostest=check"

# The product's GRUB menu with mkarchiso's substitutions, as on a real ISO.
grub_cfg() {
	sed -e "s|%ARCHISO_LABEL%|$ISO_LABEL|g" -e 's|%INSTALL_DIR%|arch|g' -e 's|%ARCH%|x86_64|g' "$REPO/grub/grub.cfg"
}

# build_iso LAYOUT OUT [LABEL [PAD_MIB]]: the live ISO (the root in
# ISO_SFS, default the busybox one) in a distribution's
# layout, bootable by its own loaders: syslinux (BIOS) and GRUB (UEFI) for
# archiso layouts, GRUB for both with grub-mkrescue. LABEL (default
# $ISO_LABEL) and PAD_MIB of padding make another, larger "release".
build_iso() {
	local layout=$1 out=$2 tree=$WORK/isotree-${2##*/}
	local ISO_LABEL=${3:-$ISO_LABEL} pad=${4:-0}
	rm -rf "$tree"
	mkdir -p "$tree/arch/x86_64" "$tree/arch/boot/x86_64" "$tree/boot/syslinux" "$tree/boot/grub" "$tree/EFI/BOOT"
	cp "${ISO_SFS:-$WORK/airootfs.sfs}" "$tree/arch/x86_64/airootfs.sfs"
	cp "$WORK/vmlinuz" "$tree/arch/boot/x86_64/vmlinuz-linux"
	cp "$WORK/initramfs.img" "$tree/arch/boot/x86_64/initramfs-linux.img"
	cat >"$tree/boot/syslinux/syslinux.cfg" <<SYSLINUX
SERIAL 0 115200
DEFAULT mados
PROMPT 0
TIMEOUT 0
LABEL mados
  LINUX /arch/boot/x86_64/vmlinuz-linux
  INITRD /arch/boot/x86_64/initramfs-linux.img
  APPEND archisobasedir=arch archisolabel=$ISO_LABEL $BOOTMENU_EXTRA
SYSLINUX
	grub_cfg >"$tree/boot/grub/grub.cfg"
	printf 'set timeout=0\nset mados_extra="%s"\n' "$BOOTMENU_EXTRA" >"$tree/boot/grub/mados-local.cfg"
	if [[ ! -e $WORK/BOOTx64.EFI ]]; then
		# shellcheck disable=SC2016 # $root is GRUB's, not the shell's
		printf 'search --no-floppy --set=root --label %s\nset prefix=($root)/boot/grub\nconfigfile /boot/grub/grub.cfg\n' \
			"$ISO_LABEL" >"$WORK/grub-early.cfg"
		grub-mkstandalone -O x86_64-efi -o "$WORK/BOOTx64.EFI" --locales= --fonts= --themes= \
			--modules="part_gpt part_msdos iso9660 fat search search_label linux normal configfile test echo" \
			"boot/grub/grub.cfg=$WORK/grub-early.cfg"
	fi
	cp "$WORK/BOOTx64.EFI" "$tree/EFI/BOOT/BOOTx64.EFI"
	((pad == 0)) || head -c "${pad}M" /dev/urandom >"$tree/arch/padding"
	MKIMAGE_LABEL=$ISO_LABEL "$REPO/tests/fixtures/mkimage" "$layout" "$out" "$tree"
}

# boot_firmware NAME TIMEOUT bios|uefi IMAGE: boot a stick through its own
# bootloader (no -kernel), serial to $WORK/NAME.log
boot_firmware() {
	local name=$1 timeout=$2 fw=$3 img=$4 logf=$WORK/$1.log fwargs=()
	if [[ $fw == uefi ]]; then
		cp /usr/share/OVMF/OVMF_VARS_4M.fd "$WORK/$name.vars"
		fwargs=(-drive "if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd"
			-drive "if=pflash,format=raw,file=$WORK/$name.vars")
	fi
	timeout "$timeout" qemu-system-x86_64 -machine q35,accel=tcg -m 1024 -smp 1 \
		-nographic -no-reboot -nodefaults -serial "file:$logf" "${fwargs[@]}" \
		-device qemu-xhci,id=xhci -drive "if=none,id=stick,format=raw,file=$img" \
		-device usb-storage,bus=xhci.0,drive=stick,removable=on,bootindex=1 \
		</dev/null >/dev/null 2>"$WORK/$name.qemu.err" || true
	tr -d '\r' <"$logf" >"$logf.txt"
	mv "$logf.txt" "$logf"
}

build_all() {
	ensure_packages
	build_binary
	log "building the test initramfs and live root"
	build_initramfs
	build_liveroot
	build_iso archiso "$WORK/madOS-archiso.iso"
}

# serial_typer LOG FIFO PROMPT LINE...: type each LINE (and Enter) into
# the guest's serial console once PROMPT has appeared once more in LOG
# than before it: a person answering the prompts in order.
serial_typer() {
	local logf=$1 fifo=$2 prompt=$3 n=0 line
	shift 3
	for line in "$@"; do
		n=$((n + 1))
		until (($(grep -c -- "$prompt" "$logf" 2>/dev/null) >= n)); do sleep 0.5; done
		sleep 0.5
		printf '%s\r' "$line" >"$fifo"
	done
}

# qemu_kernel NAME TIMEOUT INITRD APPEND QEMU-ARGS...: boot Debian's kernel
# with an initramfs under TCG, serial console to $WORK/NAME.log. With
# TYPE_PROMPT and TYPE_LINES (one a line) set, the console is a pipe too
# and serial_typer answers the prompts.
qemu_kernel() {
	local name=$1 timeout=$2 initrd=$3 append=$4
	shift 4
	local logf=$WORK/$name.log
	local serial=(-serial "file:$logf") typer='' drain=
	if [[ -n ${TYPE_PROMPT:-} ]]; then
		local fifo=$WORK/$name.serial lines=()
		rm -f "$fifo.in" "$fifo.out" "$logf"
		mkfifo "$fifo.in" "$fifo.out"
		: >"$logf"
		serial=(-chardev "pipe,id=ser0,path=$fifo,logfile=$logf" -serial chardev:ser0)
		cat "$fifo.out" >/dev/null &
		drain=$!
		mapfile -t lines <<<"$TYPE_LINES"
		serial_typer "$logf" "$fifo.in" "$TYPE_PROMPT" "${lines[@]}" &
		typer=$!
	fi
	# QEMU_KILL=1: SIGKILL at the timeout, a power cut for the guest;
	# QEMU_MEM: the guest's RAM in MiB (bench/luks: a 1 GiB machine)
	# --foreground: timeout signals QEMU alone and waits for it to be gone.
	# Without it, a KILL goes to timeout's own process group, timeout
	# included, and the next boot could start while the killed QEMU still
	# held the image's lock ("Failed to get \"write\" lock", seen in
	# scenario q with two scenarios running at once)
	timeout --foreground ${QEMU_KILL:+-s KILL} "$timeout" qemu-system-x86_64 -machine pc,accel=tcg -m "${QEMU_MEM:-1536}" -smp 1 \
		-nographic -no-reboot -nodefaults "${serial[@]}" \
		-kernel "$WORK/vmlinuz" -initrd "$initrd" -append "console=ttyS0 panic=-1 no_timer_check $append" \
		"$@" </dev/null >/dev/null 2>"$WORK/$name.qemu.err" || true
	if [[ -n $typer ]]; then
		kill "$typer" 2>/dev/null || true
		wait "$typer" 2>/dev/null || true
		kill "$drain" 2>/dev/null || true
		wait "$drain" 2>/dev/null || true
		rm -f "$WORK/$name.serial.in" "$WORK/$name.serial.out"
	fi
	tr -d '\r' <"$logf" >"$logf.txt"
	mv "$logf.txt" "$logf"
}

# boot_vm NAME TIMEOUT APPEND QEMU-ARGS...: the test initramfs (archiso-like)
boot_vm() {
	local name=$1 timeout=$2 append=$3
	shift 3
	qemu_kernel "$name" "$timeout" "$WORK/initramfs.img" "loglevel=4 archisolabel=$ISO_LABEL $append" "$@"
}

# QEMU arguments for a USB stick / CD-ROM / virtio disk.
usb_stick() { echo "-device qemu-xhci,id=xhci -drive if=none,id=stick,format=raw,file=$1 -device usb-storage,bus=xhci.0,drive=stick,removable=on"; }
# The same stick write-protected (a lock switch): the device reports it
usb_stick_ro() { echo "-device qemu-xhci,id=xhci -drive if=none,id=stick,format=raw,readonly=on,file=$1 -device usb-storage,bus=xhci.0,drive=stick,removable=on"; }
# A stick throttled like USB 2 (20 MB/s, 400 IOPS), as in bench/run.
slow_stick() { echo "-device qemu-xhci,id=xhci -drive if=none,id=stick,format=raw,file=$1,throttling.bps-total=20000000,throttling.iops-total=400 -device usb-storage,bus=xhci.0,drive=stick,removable=on"; }
cdrom() { echo "-drive if=none,id=cd,format=raw,media=cdrom,readonly=on,file=$1 -device ide-cd,drive=cd"; }
virtio_disk() { echo "-drive if=virtio,format=raw,file=$1"; }

# The state.json a boot printed between the markers.
state_of() { sed -n '/^=== MADOS-STATE$/,/^=== MADOS-END$/p' "$WORK/$1.log" | sed '1d;$d'; }

# A dracut initramfs for Debian's kernel with dmsquash-live and our module
# (and dracut's default modules: `shutdown` gives it /shutdown), built from
# a copy of the installed dracut (nothing is installed into it), and the
# busybox live root's ISO booted by it.
build_dracut() {
	build_dracut_initramfs initramfs-dracut
	dracut_iso "$WORK/airootfs.sfs" "$WORK/madOS-dracut.iso"
}
# build_dracut_initramfs [NAME]: $WORK/NAME.img (default initramfs-dracut),
# its own build dirs (two scenarios may build at once). With
# MADOS_PERSISTENCE_ENCRYPT=1 in the environment, our module's builder
# switch, the image carries cryptsetup and dm_crypt (scenario mw).
build_dracut_initramfs() {
	local kv name=${1:-initramfs-dracut}
	local base=$WORK/dracut-base-$name bin=$WORK/dracut-bin-$name
	kv=$(kernel_version)
	rm -rf "$base" "$bin"
	cp -a /usr/lib/dracut "$base"
	cp -rT "$DRACUT_MODULE" "$base/modules.d/90mados-persistence"
	mkdir -p "$bin"
	cp "$BIN" "$bin/mados-persistence"
	DRACUT_PATH="$bin /sbin /bin /usr/sbin /usr/bin" dracutbasedir=$base dracut --quiet --force --no-hostonly --no-hostonly-cmdline \
		--kver "$kv" --omit "systemd systemd-initrd systemd-networkd dracut-systemd plymouth i18n resume" \
		--add "dmsquash-live mados-persistence" \
		--add-drivers "xhci_pci xhci_hcd usb_storage sd_mod sr_mod cdrom isofs squashfs overlay ext4 loop crc32c_generic ata_piix autofs4" \
		"$WORK/$name.img" 2>"$WORK/$name.dracut.log" || { cat "$WORK/$name.dracut.log" >&2; return 1; }
	# build_all copied it; again only when another kernel is newer (a
	# copy over the file a running guest boots from could cut it short)
	cmp -s "/boot/vmlinuz-$kv" "$WORK/vmlinuz" || cp "/boot/vmlinuz-$kv" "$WORK/vmlinuz"
}

# dracut_iso SFS OUT: a Fedora-style live ISO, LiveOS/squashfs.img holding
# the live root SFS
dracut_iso() {
	local tree=$WORK/dracut-isotree-${2##*/}
	rm -rf "$tree"
	mkdir -p "$tree/LiveOS"
	cp "$1" "$tree/LiveOS/squashfs.img"
	"$REPO/tests/fixtures/mkimage" archiso "$2" "$tree"
}

# boot_dracut NAME APPEND QEMU-ARGS...: the dracut initramfs (dmsquash-live),
# $WORK/$DRACUT_IMG.img (default initramfs-dracut)
boot_dracut() {
	local name=$1 append=$2
	shift 2
	qemu_kernel "$name" 300 "$WORK/${DRACUT_IMG:-initramfs-dracut}.img" \
		"root=live:CDLABEL=$ISO_LABEL rd.live.image rd.live.overlay.overlayfs=1 rd.shell=0 rd.emergency=poweroff $append" "$@"
}

# build_plymouth_initramfs: $WORK/initramfs-plymouth.img, the test
# initramfs with Debian's plymouth (plymouthd, the client, the details
# theme; the packages fetched with apt-get download once into $CACHE,
# unpacked there, nothing installed on this machine). initramfs-init
# starts plymouthd with madostest.plymouth=1 (scenario wy).
build_plymouth_initramfs() {
	local pr=$CACHE/plymouth root=$WORK/initramfs-plymouth libdir=/usr/lib/x86_64-linux-gnu f lib
	if [[ ! -x $pr/root/usr/sbin/plymouthd ]]; then
		rm -rf "$pr"
		mkdir -p "$pr"
		chmod 777 "$pr" # apt-get download runs as _apt
		(cd "$pr" && apt-get download plymouth libplymouth5 >/dev/null 2>&1 && for f in ./*.deb; do dpkg-deb -x "$f" root; done) ||
			{ echo "qemu: could not fetch plymouth" >&2; return 1; }
	fi
	rm -rf "$root"
	cp -a "$WORK/initramfs" "$root"
	mkdir -p "$root/usr/sbin" "$root/usr/bin" "$root$libdir/plymouth" "$root/usr/share/plymouth/themes" "$root/etc/plymouth"
	cp "$pr/root/usr/sbin/plymouthd" "$root/usr/sbin/plymouthd"
	cp "$pr/root/usr/bin/plymouth" "$root/usr/bin/plymouth"
	cp -a "$pr/root$libdir"/libply* "$root$libdir/"
	cp "$pr/root$libdir/plymouth/details.so" "$pr/root$libdir/plymouth/text.so" "$root$libdir/plymouth/"
	cp -r "$pr/root/usr/share/plymouth/themes/details" "$root/usr/share/plymouth/themes/"
	printf '[Daemon]\nTheme=details\nShowDelay=0\nDeviceTimeout=2\n' >"$root/etc/plymouth/plymouthd.conf"
	# the libraries they need from this machine (libudev, libdrm, libpng…)
	for f in "$root/usr/sbin/plymouthd" "$root/usr/bin/plymouth" "$root$libdir"/plymouth/*.so "$root$libdir"/libply*.so.*; do
		for lib in $(LD_LIBRARY_PATH=$pr/root$libdir ldd "$f" | grep -o '/[^ ]*' | grep -v "^$pr"); do
			[[ -e $root$lib ]] && continue
			mkdir -p "$root$(dirname "$lib")"
			cp -L "$lib" "$root$lib"
		done
	done
	(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) >"$WORK/initramfs-plymouth.img"
}

# --- The systemd live root ----------------------------------------------------
# Debian bookworm's systemd as the live ISO's root (qemu/systemd-scenarios):
# made by mmdebstrap once and kept as a tarball in $CACHE, keyed by what
# makes it (MADOS_QEMU_CACHE: a cache dir kept across clones). The mirror
# is the first Debian one this machine's apt uses.
CACHE=${MADOS_QEMU_CACHE:-$WORK/cache}
SDROOT_PACKAGES=systemd,systemd-sysv,udev,util-linux,e2fsprogs
debian_mirror() {
	local m
	m=$(sed -n 's/^URIs: *\(http[^ ]*\/debian\)\/*$/\1/p; s/^deb  *\(http[^ ]*\/debian\)\/* bookworm .*/\1/p' \
		/etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null | head -n1 || true)
	echo "${MADOS_DEBIAN_MIRROR:-${m:-http://deb.debian.org/debian}}"
}
# sdroot_tar: print the cached root tarball's path, making it if missing
sdroot_tar() {
	local key tar
	key=$(printf '%s\n' bookworm essential "$SDROOT_PACKAGES" | sha256sum | cut -c1-12)
	tar=$CACHE/sdroot-$key.tar
	if [[ ! -s $tar ]]; then
		command -v mmdebstrap >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mmdebstrap >/dev/null
		mkdir -p "$CACHE"
		log "making the systemd live root with mmdebstrap (bookworm, once; cached as $tar)"
		mmdebstrap --quiet --format=tar --variant=essential --include="$SDROOT_PACKAGES" \
			--aptopt='APT::Install-Recommends "false"' --dpkgopt='path-exclude=/usr/share/doc/*' \
			--dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
			bookworm "$tar.part" "deb $(debian_mirror) bookworm main" </dev/null >"$CACHE/mmdebstrap.log" 2>&1 ||
			{ cat "$CACHE/mmdebstrap.log" >&2; return 1; }
		mv "$tar.part" "$tar"
	fi
	echo "$tar"
}

# build_sdroot archiso|dracut: the systemd live root's squashfs: the
# cached bookworm root with the binary, the units, the config and the
# shutdown hook installed where a package puts them (/usr/bin,
# /usr/lib/systemd/system, enabled as `systemctl enable` does, /etc/mados,
# /usr/lib/systemd/system-shutdown), and the test driver
# (qemu/systemd/: madostest.service runs madostest when the kernel
# command line has madostest=). archiso: $WORK/sdroot.sfs, for an
# archiso-layout ISO (mkinitcpio's initramfs or the test one); dracut:
# $WORK/sdroot-dracut.sfs, the root of a dracut-built live ISO, which
# carries dracut-shutdown.service as Debian's dracut package installs it
# (from this machine's dracut-core, bookworm's too)
build_sdroot() {
	local root=$WORK/sdroot tar unit u out=$WORK/sdroot.sfs
	tar=$(sdroot_tar)
	rm -rf "$root"
	mkdir -p "$root"
	tar -C "$root" -xf "$tar"
	install -m 755 "$BIN" "$root/usr/bin/mados-persistence"
	for unit in "$UNIT_DIR"/mados-persistence*.service; do
		u=$(basename "$unit")
		install -m 644 "$unit" "$root/usr/lib/systemd/system/$u"
		local target
		target=$(sed -n 's/^WantedBy=//p' "$unit")
		mkdir -p "$root/etc/systemd/system/$target.wants"
		ln -sf "/lib/systemd/system/$u" "$root/etc/systemd/system/$target.wants/$u"
	done
	install -D -m 644 "$CONFIG_FILE" "$root/etc/mados/persistence.toml"
	install -D -m 755 "$SHUTDOWN_HOOK" "$root/usr/lib/systemd/system-shutdown/mados-persistence.shutdown"
	install -m 644 "$QEMU_DIR"/systemd/*.service "$root/usr/lib/systemd/system/"
	install -m 755 "$QEMU_DIR/systemd/madostest" "$root/usr/local/sbin/madostest"
	ln -sf /lib/systemd/system/madostest.service "$root/etc/systemd/system/multi-user.target.wants/madostest.service"
	# the serial console is the test's channel: no login prompt on it
	ln -sf /dev/null "$root/etc/systemd/system/serial-getty@ttyS0.service"
	echo madOS >"$root/etc/hostname"
	mkdir -p "$root/home/live"
	if [[ ${1:-} == dracut ]]; then
		out=$WORK/sdroot-dracut.sfs
		for u in dracut-shutdown.service dracut-shutdown-onfailure.service; do
			install -m 644 "/usr/lib/systemd/system/$u" "$root/usr/lib/systemd/system/$u"
		done
		mkdir -p "$root/usr/lib/systemd/system/sysinit.target.wants"
		ln -sf ../dracut-shutdown.service "$root/usr/lib/systemd/system/sysinit.target.wants/dracut-shutdown.service"
		install -D -m 755 /usr/lib/dracut/dracut-initramfs-restore "$root/usr/lib/dracut/dracut-initramfs-restore"
		install -m 755 /usr/lib/dracut/skipcpio "$root/usr/lib/dracut/skipcpio"
	fi
	rm -f "$out"
	# lz4: built in a second (gzip takes 20 s here), read as fast
	mksquashfs "$root" "$out" -quiet -noappend -comp lz4 >/dev/null
}
