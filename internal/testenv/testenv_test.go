package testenv

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestLibrary: a pattern finds a shared library of this process's
// architecture in Debian's multiarch directories; a file that is not one,
// or is one of another architecture, is passed over, and the error names
// every pattern searched.
func TestLibrary(t *testing.T) {
	dir := t.TempDir()
	fake := filepath.Join(dir, "libfake.so")
	if err := os.WriteFile(fake, []byte("not an ELF object"), 0o600); err != nil {
		t.Fatal(err)
	}
	own, ok := self()
	if !ok {
		t.Fatal("this test binary is not an ELF executable")
	}
	other := elf.EM_AARCH64
	if own.Machine == other {
		other = elf.EM_X86_64
	}
	foreign := filepath.Join(dir, "libforeign.so")
	writeELFHeader(t, foreign, other)
	if _, err := Library(foreign); err == nil {
		t.Fatalf("Library took a shared object for %v in a %v process", other, own.Machine)
	}
	native := filepath.Join(dir, "libnative.so")
	writeELFHeader(t, native, own.Machine)
	if got, err := Library(foreign, native); got != native || err != nil {
		t.Fatalf("Library(foreign, native) = %q, %v", got, err)
	}
	// libc is where every Debian architecture has it, in the multiarch
	// directory of this process's.
	libc, err := Library(fake, "/usr/lib/*/libc.so.6", "/lib/*/libc.so.6")
	if err != nil || !strings.HasSuffix(libc, "/libc.so.6") {
		t.Fatalf("Library found %q, %v; want this architecture's libc.so.6", libc, err)
	}
	if _, err := Library(fake, filepath.Join(dir, "*", "libnone.so")); err == nil ||
		!strings.Contains(err.Error(), fake) || !strings.Contains(err.Error(), "libnone.so") {
		t.Fatalf("Library of no library: %v; want an error naming both patterns", err)
	}
}

// writeELFHeader writes the ELF header of a shared object for machine,
// of this process's class and byte order, and nothing else: enough for
// debug/elf to read.
func writeELFHeader(t *testing.T, path string, machine elf.Machine) {
	t.Helper()
	own, _ := self()
	var order binary.ByteOrder = binary.LittleEndian
	if own.Data == elf.ELFDATA2MSB {
		order = binary.BigEndian
	}
	ident := [elf.EI_NIDENT]byte{0x7f, 'E', 'L', 'F', byte(own.Class), byte(own.Data), byte(elf.EV_CURRENT)}
	var h any = elf.Header64{Ident: ident, Type: uint16(elf.ET_DYN), Machine: uint16(machine), Version: uint32(elf.EV_CURRENT),
		Ehsize: 64, Phentsize: 56, Shentsize: 64}
	if own.Class == elf.ELFCLASS32 {
		h = elf.Header32{Ident: ident, Type: uint16(elf.ET_DYN), Machine: uint16(machine), Version: uint32(elf.EV_CURRENT),
			Ehsize: 52, Phentsize: 32, Shentsize: 40}
	}
	var b bytes.Buffer
	if err := binary.Write(&b, order, h); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, b.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
}
