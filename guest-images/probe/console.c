/* Polled 16550 output on COM1: no interrupts, so every byte waits for the transmitter. */
#include "console.h"
#include "cpu.h"
#include "smp.h"

#define COM1 0x3f8
#define UART_IER 1
#define UART_LCR 3
#define UART_LSR 5
#define LSR_THR_EMPTY 0x20
#define LSR_DATA_READY 0x01
#define LCR_8N1 0x03
/* A UART that never reports an empty transmitter must not hang the probe. */
#define THR_POLL_LIMIT 100000

void console_init(void)
{
	outb(COM1 + UART_IER, 0);
	outb(COM1 + UART_LCR, LCR_8N1);
}

void out_char(char c)
{
	for (u32 i = 0; i < THR_POLL_LIMIT; i++)
		if (inb(COM1 + UART_LSR) & LSR_THR_EMPTY)
			break;
	outb(COM1, (u8)c);
}

void out_str(const char *s)
{
	while (*s)
		out_char(*s++);
}

void out_strn(const char *s, usize n)
{
	for (usize i = 0; i < n && s[i]; i++)
		out_char(s[i]);
}

void out_hex(u64 v)
{
	static const char digits[] = "0123456789abcdef";
	int shift = 60;
	out_str("0x");
	while (shift > 0 && ((v >> shift) & 0xf) == 0)
		shift -= 4;
	for (; shift >= 0; shift -= 4)
		out_char(digits[(v >> shift) & 0xf]);
}

void out_dec(u64 v)
{
	char buf[20];
	int n = 0;
	do {
		buf[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (n)
		out_char(buf[--n]);
}

/* Lines from application processors say which CPU: "probe: cpuN: ...". */
void line_begin(void)
{
	console_lock();
	out_str("probe: ");
	u32 cpu = cpu_apic_id();
	if (cpu) {
		out_str("cpu");
		out_dec(cpu);
		out_str(": ");
	}
}

void line_end(void)
{
	out_char('\n');
	console_unlock();
}

void say(const char *s)
{
	line_begin();
	out_str(s);
	line_end();
}

void error_begin(const char *s)
{
	line_begin();
	out_str("error ");
	out_str(s);
}

/* Waits for one received byte: the host feeds its stdin to COM1. */
u8 in_char(void)
{
	while (!(inb(COM1 + UART_LSR) & LSR_DATA_READY))
		cpu_relax_barrier();
	return inb(COM1);
}
