/* RSDP discovery, root-table walk and checksums. Table memory is read through map_phys, so
 * tables anywhere below the physical address limit work. */
#include "acpi.h"
#include "console.h"
#include "mem.h"
#include "paging.h"

#define BP_ACPI_RSDP_ADDR 0x070
#define BIOS_EBDA_SEGMENT_PTR 0x40e
#define EBDA_WINDOW 1024
#define BIOS_SCAN_START 0xe0000
#define BIOS_SCAN_END 0x100000
#define RSDP_V1_LEN 20
#define RSDP_V2_MIN_LEN 36
#define RSDP_REVISION 15
#define RSDP_RSDT_ADDR 16
#define RSDP_LENGTH 20
#define RSDP_XSDT_ADDR 24
#define FADT_DSDT 40
#define FADT_X_DSDT 140
/* Bigger than any table a VMM builds; stops a corrupt length from mapping gigabytes. */
#define TABLE_MAX_LEN (16u << 20)

static u64 rsdp_phys;

int acpi_checksum_ok(const u8 *p, u32 len)
{
	u8 sum = 0;
	for (u32 i = 0; i < len; i++)
		sum += p[i];
	return sum == 0;
}

static int rsdp_v1_valid(const u8 *p)
{
	return memcmp(p, "RSD PTR ", 8) == 0 && acpi_checksum_ok(p, RSDP_V1_LEN);
}

static u64 scan_for_rsdp(u64 start, u64 end)
{
	for (u64 a = start; a + RSDP_V1_LEN <= end; a += 16)
		if (rsdp_v1_valid((const u8 *)(usize)a))
			return a;
	return 0;
}

int acpi_init(const u8 *boot_params)
{
	u64 addr = rd64(boot_params + BP_ACPI_RSDP_ADDR);
	if (addr) {
		if (map_phys(addr, RSDP_V2_MIN_LEN, MAP_WRITEBACK))
			return -1;
		if (memcmp((const u8 *)(usize)addr, "RSD PTR ", 8) != 0) {
			error_begin("boot_params.acpi_rsdp_addr ");
			out_hex(addr);
			out_str(" does not point at \"RSD PTR \"");
			line_end();
			return -1;
		}
		rsdp_phys = addr;
		return 0;
	}
	/* Linux's legacy search: the first KiB of the EBDA, then the BIOS area. */
	u64 ebda = (u64)rd16((const u8 *)BIOS_EBDA_SEGMENT_PTR) << 4;
	if (ebda > 0x400 && ebda + EBDA_WINDOW <= BIOS_SCAN_END)
		rsdp_phys = scan_for_rsdp(ebda, ebda + EBDA_WINDOW);
	if (!rsdp_phys)
		rsdp_phys = scan_for_rsdp(BIOS_SCAN_START, BIOS_SCAN_END);
	if (!rsdp_phys) {
		error_begin("no RSDP: boot_params.acpi_rsdp_addr is 0 and no \"RSD PTR \" in ");
		out_hex(BIOS_SCAN_START);
		out_str("..");
		out_hex(BIOS_SCAN_END);
		line_end();
		return -1;
	}
	return 0;
}

const u8 *acpi_map_table(u64 phys)
{
	if (map_phys(phys, ACPI_HEADER_LEN, MAP_WRITEBACK))
		return NULL;
	const u8 *t = (const u8 *)(usize)phys;
	u32 len = rd32(t + 4);
	if (len < ACPI_HEADER_LEN || len > TABLE_MAX_LEN) {
		error_begin("table at ");
		out_hex(phys);
		out_str(" has length ");
		out_dec(len);
		out_str(", outside ");
		out_dec(ACPI_HEADER_LEN);
		out_str("..");
		out_dec(TABLE_MAX_LEN);
		line_end();
		return NULL;
	}
	if (map_phys(phys, len, MAP_WRITEBACK))
		return NULL;
	return t;
}

/* The XSDT when the RSDP has one, else the RSDT; *entry_size is 8 or 4. */
static int have_rsdp(void)
{
	if (!rsdp_phys)
		say("error no ACPI tables: the RSDP was not found at start");
	return rsdp_phys != 0;
}

static const u8 *root_table(u32 *entry_size)
{
	if (!have_rsdp())
		return NULL;
	const u8 *rsdp = (const u8 *)(usize)rsdp_phys;
	u64 xsdt = rsdp[RSDP_REVISION] >= 2 ? rd64(rsdp + RSDP_XSDT_ADDR) : 0;
	if (xsdt) {
		*entry_size = 8;
		return acpi_map_table(xsdt);
	}
	*entry_size = 4;
	return acpi_map_table(rd32(rsdp + RSDP_RSDT_ADDR));
}

static u32 root_entries(const u8 *root, u32 entry_size)
{
	return (rd32(root + 4) - ACPI_HEADER_LEN) / entry_size;
}

static u64 root_entry(const u8 *root, u32 entry_size, u32 i)
{
	const u8 *e = root + ACPI_HEADER_LEN + i * entry_size;
	return entry_size == 8 ? rd64(e) : rd32(e);
}

static u64 fadt_dsdt(const u8 *fadt)
{
	u32 len = rd32(fadt + 4);
	u64 x = len >= FADT_X_DSDT + 8 ? rd64(fadt + FADT_X_DSDT) : 0;
	return x ? x : rd32(fadt + FADT_DSDT);
}

static void print_table_line(const u8 *sig, u32 len, int ok)
{
	line_begin();
	out_str("table ");
	for (int i = 0; i < 4; i++)
		out_char(sig[i] >= 0x20 && sig[i] < 0x7f ? (char)sig[i] : '?');
	out_str(" len=");
	out_dec(len);
	out_str(ok ? " checksum=ok" : " checksum=BAD");
	line_end();
}

static int print_table(u64 phys)
{
	const u8 *t = acpi_map_table(phys);
	if (!t)
		return -1;
	u32 len = rd32(t + 4);
	print_table_line(t, len, acpi_checksum_ok(t, len));
	return 0;
}

int acpi_list_tables(void)
{
	if (!have_rsdp())
		return -1;
	const u8 *rsdp = (const u8 *)(usize)rsdp_phys;
	u32 rsdp_len = RSDP_V1_LEN;
	int rsdp_ok = acpi_checksum_ok(rsdp, RSDP_V1_LEN);
	if (rsdp[RSDP_REVISION] >= 2) {
		rsdp_len = rd32(rsdp + RSDP_LENGTH);
		if (rsdp_len < RSDP_V2_MIN_LEN || rsdp_len > 4096 ||
		    map_phys(rsdp_phys, rsdp_len, MAP_WRITEBACK))
			rsdp_ok = 0;
		else
			rsdp_ok = rsdp_ok && acpi_checksum_ok(rsdp, rsdp_len);
	}
	print_table_line((const u8 *)"RSDP", rsdp_len, rsdp_ok);

	u32 entry_size;
	const u8 *root = root_table(&entry_size);
	if (!root)
		return -1;
	print_table_line(root, rd32(root + 4), acpi_checksum_ok(root, rd32(root + 4)));
	int rc = 0;
	u32 n = root_entries(root, entry_size);
	for (u32 i = 0; i < n; i++) {
		u64 phys = root_entry(root, entry_size, i);
		if (print_table(phys)) {
			rc = -1;
			continue;
		}
		const u8 *t = (const u8 *)(usize)phys;
		if (memcmp(t, "FACP", 4) == 0 && print_table(fadt_dsdt(t)))
			rc = -1;
	}
	return rc;
}

const u8 *acpi_find_table(const char *sig)
{
	int dsdt = memcmp(sig, "DSDT", 4) == 0;
	u32 entry_size;
	const u8 *root = root_table(&entry_size);
	if (!root)
		return NULL;
	u32 n = root_entries(root, entry_size);
	for (u32 i = 0; i < n; i++) {
		const u8 *t = acpi_map_table(root_entry(root, entry_size, i));
		if (!t)
			continue;
		if (dsdt && memcmp(t, "FACP", 4) == 0)
			return acpi_map_table(fadt_dsdt(t));
		if (!dsdt && memcmp(t, sig, 4) == 0)
			return t;
	}
	return NULL;
}
