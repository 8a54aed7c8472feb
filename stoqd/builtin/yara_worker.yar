// stoqd's default rules for the yara worker: broad file-kind labels, a starting point.
// Point the yara plugin's worker_rules option at your own rules file to replace them.

rule stoqd_elf_executable : executable
{
    meta:
        description = "ELF binary (Linux and other Unix executables and libraries)"
    condition:
        uint32(0) == 0x464c457f
}

rule stoqd_pe_executable : executable
{
    meta:
        description = "Windows PE file: an MZ header pointing at a PE signature"
    condition:
        uint16(0) == 0x5a4d and filesize > 64 and
        uint32(0x3c) < filesize - 4 and uint32(uint32(0x3c)) == 0x00004550
}

rule stoqd_macho_executable : executable
{
    meta:
        description = "Mach-O binary (macOS), 32 or 64 bit, either byte order, or universal"
    condition:
        uint32(0) == 0xfeedface or uint32(0) == 0xfeedfacf or
        uint32(0) == 0xcefaedfe or uint32(0) == 0xcffaedfe or uint32be(0) == 0xcafebabe
}

rule stoqd_eicar_test_file : test
{
    meta:
        description = "The EICAR anti-malware test string at the start of the payload"
    strings:
        $eicar = "EICAR-STANDARD-ANTIVIRUS-TEST-FILE!"
    condition:
        $eicar in (0..128)
}

rule stoqd_shell_script : script
{
    meta:
        description = "A script with a #! interpreter line"
    condition:
        uint16(0) == 0x2123
}
