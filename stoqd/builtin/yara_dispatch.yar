// stoqd's default dispatch rules: the `plugin` meta names the worker(s), comma-separated,
// a payload that matches is sent to. Archives recognised by their magic bytes go to
// the decompress worker.

rule stoqd_zip_archive : archive
{
    meta:
        plugin = "decompress"
        description = "ZIP archive (local file header or empty archive)"
    condition:
        uint32(0) == 0x04034b50 or uint32(0) == 0x06054b50
}

rule stoqd_gzip_stream : archive
{
    meta:
        plugin = "decompress"
        description = "gzip stream (deflate)"
    condition:
        uint16(0) == 0x8b1f and uint8(2) == 0x08
}

rule stoqd_bzip2_stream : archive
{
    meta:
        plugin = "decompress"
        description = "bzip2 stream"
    strings:
        $magic = /^BZh[1-9]/
    condition:
        $magic at 0
}

rule stoqd_xz_stream : archive
{
    meta:
        plugin = "decompress"
        description = "xz stream"
    strings:
        $magic = { FD 37 7A 58 5A 00 }
    condition:
        $magic at 0
}

rule stoqd_tar_archive : archive
{
    meta:
        plugin = "decompress"
        description = "POSIX or GNU tar archive (ustar magic at offset 257)"
    strings:
        $ustar = "ustar"
    condition:
        $ustar at 257
}
