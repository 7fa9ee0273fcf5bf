"""Things that need the QEMU guest (dmimage.guest), see docs/vm.md."""
