/* The application processors' way in. A SIPI starts an AP in real mode at TRAMPOLINE (the
 * vector's page, below 1 MiB) with CS = TRAMPOLINE >> 4; this code, copied there by smp.c,
 * goes to protected mode, turns on PAE and long mode with the boot CPU's page tables, and jumps
 * to ap_main on the stack smp.c left in ap_tramp_stack. Everything here is addressed from the
 * trampoline's base, so it works wherever the copy lives. */
	.set	TRAMPOLINE, 0x10000

	.section .rodata
	.globl	ap_trampoline_start, ap_trampoline_end
	.globl	ap_tramp_cr3, ap_tramp_stack, ap_tramp_entry
	.balign	16
ap_trampoline_start:
	.code16
	cli
	cld
	mov	%cs, %ax
	mov	%ax, %ds
	lgdtl	gdt_desc - ap_trampoline_start
	mov	%cr0, %eax
	or	$1, %eax
	mov	%eax, %cr0
	ljmpl	$0x08, $(TRAMPOLINE + pm32 - ap_trampoline_start)

	.code32
pm32:
	mov	$0x10, %ax
	mov	%ax, %ds
	mov	%ax, %es
	mov	%ax, %ss
	mov	%cr4, %eax
	or	$0x20, %eax			/* PAE */
	mov	%eax, %cr4
	mov	(TRAMPOLINE + ap_tramp_cr3 - ap_trampoline_start), %eax
	mov	%eax, %cr3
	mov	$0xc0000080, %ecx		/* EFER */
	rdmsr
	or	$0x100, %eax			/* LME */
	wrmsr
	mov	%cr0, %eax
	or	$0x80000000, %eax		/* PG */
	mov	%eax, %cr0
	ljmpl	$0x18, $(TRAMPOLINE + lm64 - ap_trampoline_start)

	.code64
lm64:
	mov	$0x10, %ax
	mov	%ax, %ds
	mov	%ax, %es
	mov	%ax, %ss
	mov	(TRAMPOLINE + ap_tramp_stack - ap_trampoline_start), %rsp
	mov	(TRAMPOLINE + ap_tramp_entry - ap_trampoline_start), %rax
	xor	%ebp, %ebp
	call	*%rax
1:	cli
	hlt
	jmp	1b

	.balign	8
gdt:
	.quad	0
	.quad	0x00cf9a000000ffff		/* 0x08: 32-bit code */
	.quad	0x00cf92000000ffff		/* 0x10: data */
	.quad	0x00af9a000000ffff		/* 0x18: 64-bit code */
gdt_desc:
	.word	gdt_desc - gdt - 1
	.long	TRAMPOLINE + gdt - ap_trampoline_start
	.balign	8
ap_tramp_cr3:
	.quad	0
ap_tramp_stack:
	.quad	0
ap_tramp_entry:
	.quad	0
ap_trampoline_end:

	.section .note.GNU-stack, "", @progbits
