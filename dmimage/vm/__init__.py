"""Things that need the QEMU guest of vmtests/ (see docs/vm.md)."""
