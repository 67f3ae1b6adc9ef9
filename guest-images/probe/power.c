/* S5 through the FADT: SLEEP_CONTROL_REG on HW-reduced machines, PM1a/PM1b control otherwise. */
#include "power.h"
#include "acpi.h"
#include "console.h"
#include "cpu.h"
#include "mem.h"
#include "paging.h"

#define FADT_PM1A_CNT_BLK 64
#define FADT_PM1B_CNT_BLK 68
#define FADT_FLAGS 112
#define FADT_FLAG_HW_REDUCED (1u << 20)
#define FADT_SLEEP_CONTROL_REG 244
#define GAS_LEN 12
#define GAS_SPACE_MEMORY 0
#define GAS_SPACE_IO 1

#define AML_ZERO_OP 0x00
#define AML_ONE_OP 0x01
#define AML_BYTE_PREFIX 0x0a
#define AML_WORD_PREFIX 0x0b
#define AML_DWORD_PREFIX 0x0c
#define AML_PACKAGE_OP 0x12

/* Sleep control register: SLP_TYP in bits 4:2, SLP_EN is bit 5 (ACPI 6.x, 4.8.3.7). */
#define SLEEP_CTL_TYP_SHIFT 2
#define SLEEP_CTL_EN (1u << 5)
/* PM1 control: SLP_TYP in bits 12:10, SLP_EN is bit 13. */
#define PM1_CNT_TYP_SHIFT 10
#define PM1_CNT_EN (1u << 13)

int s5_sleep_type(const u8 *dsdt)
{
	u32 len = rd32(dsdt + 4);
	for (u32 i = ACPI_HEADER_LEN; i + 8 < len; i++) {
		if (memcmp(dsdt + i, "_S5_", 4) != 0 || dsdt[i + 4] != AML_PACKAGE_OP)
			continue;
		/* PkgLength: bits 7:6 of the lead byte count the bytes that follow it. */
		u32 p = i + 5;
		p += 1 + (dsdt[p] >> 6);
		p += 1; /* NumElements */
		if (p + 1 >= len)
			return -1;
		switch (dsdt[p]) {
		case AML_ZERO_OP:
			return 0;
		case AML_ONE_OP:
			return 1;
		case AML_BYTE_PREFIX:
		case AML_WORD_PREFIX:
		case AML_DWORD_PREFIX:
			return dsdt[p + 1];
		default:
			return -1;
		}
	}
	return -1;
}

static void gas_write(const u8 *gas, u32 value)
{
	u8 space = gas[0];
	u8 width = gas[1];
	u64 addr = rd64(gas + 4);
	if (space == GAS_SPACE_IO) {
		if (width == 16)
			outw((u16)addr, (u16)value);
		else if (width == 32)
			outl((u16)addr, value);
		else
			outb((u16)addr, (u8)value);
		return;
	}
	if (map_phys(addr, 4, MAP_UNCACHED))
		return;
	if (width == 16)
		*(volatile u16 *)(usize)addr = (u16)value;
	else if (width == 32)
		*(volatile u32 *)(usize)addr = value;
	else
		*(volatile u8 *)(usize)addr = (u8)value;
}

static void poweroff_failed(const char *why)
{
	error_begin("poweroff: ");
	out_str(why);
	line_end();
}

void acpi_poweroff(void)
{
	const u8 *fadt = acpi_find_table("FACP");
	const u8 *dsdt = acpi_find_table("DSDT");
	int slp_typ = dsdt ? s5_sleep_type(dsdt) : -1;
	if (!fadt) {
		poweroff_failed("no FADT (FACP) in the root table");
	} else if (!dsdt) {
		poweroff_failed("the FADT names no readable DSDT");
	} else if (slp_typ < 0) {
		poweroff_failed("no \\_S5_ package with a constant first element in the DSDT");
	} else if (rd32(fadt + 4) < FADT_FLAGS + 4) {
		poweroff_failed("FADT too short for its flags field");
	} else if (rd32(fadt + FADT_FLAGS) & FADT_FLAG_HW_REDUCED) {
		const u8 *gas = fadt + FADT_SLEEP_CONTROL_REG;
		if (rd32(fadt + 4) < FADT_SLEEP_CONTROL_REG + GAS_LEN || rd64(gas + 4) == 0)
			poweroff_failed("HW-reduced FADT without SLEEP_CONTROL_REG");
		else if (gas[0] != GAS_SPACE_IO && gas[0] != GAS_SPACE_MEMORY)
			poweroff_failed("SLEEP_CONTROL_REG is neither I/O nor memory space");
		else
			gas_write(gas, ((u32)(slp_typ & 7) << SLEEP_CTL_TYP_SHIFT) | SLEEP_CTL_EN);
	} else {
		u32 pm1a = rd32(fadt + FADT_PM1A_CNT_BLK);
		u32 pm1b = rd32(fadt + FADT_PM1B_CNT_BLK);
		u16 v = (u16)(((u32)(slp_typ & 7) << PM1_CNT_TYP_SHIFT) | PM1_CNT_EN);
		if (!pm1a)
			poweroff_failed("FADT has neither HW_REDUCED_ACPI nor PM1a_CNT_BLK");
		else {
			outw((u16)pm1a, v);
			if (pm1b)
				outw((u16)pm1b, v);
		}
	}
	halt_forever();
}
