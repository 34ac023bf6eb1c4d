#!/bin/sh
# dracut pre-pivot hook: layer persistence over the live root. Never fails
# the boot: mados-persistence falls back to RAM mode by itself.
# shellcheck source=/dev/null
command -v warn >/dev/null || . /lib/dracut-lib.sh
# shellcheck disable=SC2154 # NEWROOT is set by dracut
mados-persistence boot --root "${NEWROOT:-/sysroot}" ||
    warn "mados-persistence exited with $?; the boot goes on without persistence"
