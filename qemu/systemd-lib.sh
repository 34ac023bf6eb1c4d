# Shared by qemu/systemd-scenarios and qemu/real-archiso --systemd: the
# checks on a boot of the systemd live root (its driver, qemu/systemd/
# madostest, reports on the serial console) and the clean-shutdown
# sequence. Source it after lib.sh.
# shellcheck shell=bash

passed=0 failed=0 logs=()
check() { # check DESCRIPTION COMMAND...
	if "${@:2}"; then
		passed=$((passed + 1))
		echo "ok   $1"
	else
		failed=$((failed + 1))
		echo "FAIL $1"
	fi
}
log_has() { grep -q -- "$2" "$WORK/$1.log"; }
log_count() { [[ $(grep -c -- "$2" "$WORK/$1.log") == "$3" ]]; }
# grep reads all of it (no -q): an early exit would fail the pipeline
# under pipefail once state.json is longer than a pipe write
state_has() { state_of "$1" | grep -- "$2" >/dev/null; }

# fs_clean IMAGE: the stick's `persistence` filesystem is clean and its
# journal empty (what the next boot's e2fsck -p sees), read on the host
fs_clean() {
	local start lo h
	for start in $(sfdisk -d "$1" | sed -n 's/.* : start= *\([0-9]*\),.*/\1/p'); do
		lo=$(losetup -f --show -r -o $((start * 512)) "$1")
		h=$(dumpe2fs -h "$lo" 2>/dev/null)
		losetup -d "$lo"
		grep -q '^Filesystem volume name: *persistence$' <<<"$h" || continue
		grep -q '^Filesystem state: *clean$' <<<"$h" && ! grep -q '^Filesystem features:.*needs_recovery' <<<"$h"
		return
	done
	echo "fs_clean: no persistence filesystem on $1" >&2
	return 1
}

# returned_to_initrd BOOT LINE: at the end of BOOT systemd-shutdown
# switched into the shutdown initramfs, the kernel unmounted the
# persistence ext4 right then (its last users went with the live root),
# and that initramfs' /shutdown printed LINE. Needs the kernel's info
# lines on the console (no loglevel=4).
returned_to_initrd() {
	local after
	after=$(sed -n '/systemd-shutdown\[1\]: Returning to initrd/,$p' "$WORK/$1.log")
	grep -q 'EXT4-fs (sd[a-z][0-9]*): unmounting filesystem' <<<"$after" && grep -q -- "$2" <<<"$after"
}

booted() { # the boot reached the driver's end, the unit active, no unit failed
	check "$1: the driver ran to its end" log_has "$1" '^=== MADOS-DONE'
	check "$1: the companion unit is active" log_has "$1" '^UNIT-ACTIVE active$'
	check "$1: systemctl --failed is empty" log_has "$1" '^FAILED-UNITS none$'
	check "$1: the system is running (not degraded)" log_has "$1" '^SYSTEM running$'
	check "$1: the daemon met no refused call (EPERM) under its sandbox" bash -c "! grep -Eiq '^DAEMON-LOG .*(operation not permitted|permission denied|EPERM)' '$WORK/$1.log'"
}

# sd_clean_shutdowns PREFIX IMAGE BOOT SHUTDOWN_RAN [3]: the stick IMAGE
# (a fresh copy of a systemd live ISO) booted by `BOOT NAME APPEND` two
# times (three with 3): a tier file written without sync, `systemctl
# poweroff`; the file there, `systemctl reboot`; (3: `systemctl poweroff`).
# After each the filesystem is clean on the host, and the next boot's
# state.json and `status` say the last shutdown was clean.
# `SHUTDOWN_RAN NAME` checks in the console log that the shutdown
# initramfs ran at the end of boot NAME.
sd_clean_shutdowns() {
	local p=$1 img=$2 boot=$3 ran=$4 n=${5:-2}
	"$boot" "${p}1" "madostest=write,poweroff"
	booted "${p}1"
	check "${p}1: persistent, the partition created" state_has "${p}1" '"origin": "created"'
	check "${p}1: a tier file written without sync" log_has "${p}1" '^WROTE nosync'
	check "${p}1: systemctl poweroff: the shutdown initramfs ran" "$ran" "${p}1"
	check "after ${p}1's poweroff: the persistence filesystem is clean" fs_clean "$img"
	"$boot" "${p}2" "madostest=reboot"
	booted "${p}2"
	check "${p}2: the tier file written without sync is there" log_has "${p}2" '^TIER-FILE /var/log/madostest-nosync nosync'
	check "${p}2: state.json: the last shutdown (a poweroff) was clean" state_has "${p}2" '"last_shutdown": "clean"'
	check "${p}2: status says so" log_has "${p}2" '^STATUS shutdown: *the last one was clean'
	check "${p}2: systemctl reboot: the shutdown initramfs ran" "$ran" "${p}2"
	check "after ${p}2's reboot: the persistence filesystem is clean" fs_clean "$img"
	((n == 3)) || return 0
	"$boot" "${p}3" "madostest=poweroff"
	booted "${p}3"
	check "${p}3: the tier file is still there" log_has "${p}3" '^TIER-FILE /var/log/madostest-nosync nosync'
	check "${p}3: state.json: the last shutdown (a reboot) was clean" state_has "${p}3" '"last_shutdown": "clean"'
	check "after ${p}3's poweroff: the persistence filesystem is clean" fs_clean "$img"
}

# sd_report NAME: the logs of the boots (on a failure), the counts; the
# exit status
sd_report() {
	local l
	if ((failed)); then
		for l in "${logs[@]}"; do
			echo "----- $l.log"
			grep -v '^\[ *[0-9.]*\] ' "$WORK/$l.log" | tail -n 150
		done
	fi
	echo "$1: $passed passed, $failed failed"
	((failed == 0))
}
