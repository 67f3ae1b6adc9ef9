/* Entered in 64-bit mode with paging on, interrupts off and RSI = boot_params. Clears .bss,
 * switches to the probe's own stack and calls probe_main(boot_params). */
	.section .text.start, "ax"
	.code64
	.globl _start
_start:
	cli
	cld
	mov	%rsi, %r12
	lea	__bss_start(%rip), %rdi
	lea	__bss_end(%rip), %rcx
	xor	%eax, %eax
1:	cmp	%rcx, %rdi
	jae	2f
	movq	%rax, (%rdi)
	add	$8, %rdi
	jmp	1b
2:	lea	stack_top(%rip), %rsp
	xor	%ebp, %ebp
	mov	%r12, %rdi
	call	probe_main
	jmp	halt_forever

	.text
	.globl halt_forever
halt_forever:
	cli
3:	hlt
	jmp	3b

	.section .bss
	.balign 16
stack:
	.skip 16384
stack_top:

	.section .note.GNU-stack, "", @progbits
