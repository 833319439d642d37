// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
//
// Lifeboat's changed-block tracker: a CO-RE program on the block layer's request completion
// (the BTF-typed tracepoint block:block_rq_complete). For every completed request that changes
// data on a tracked disk (write, discard, secure erase, write-zeroes: the ops whose low bit is
// set, op_is_write() in the kernel), it emits {dev, sector, sectors} to a ring buffer. When the
// ring buffer is full the event is counted in `dropped`, never silently lost: user space sees
// the counter rise and rescans the disk.
//
// The kernel structs below name only the fields read; `preserve_access_index` makes every
// access a CO-RE relocation against the running kernel's BTF, so no vmlinux.h is needed and
// the object loads on any kernel with BTF whatever the field offsets.

typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef signed char __s8;
typedef short __s16;
typedef int __s32;
typedef long long __s64;
typedef __u16 __be16;
typedef __u32 __be32;
typedef __u32 __wsum;
typedef __u64 sector_t;

#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

#define BPF_MAP_TYPE_HASH 1
#define BPF_MAP_TYPE_ARRAY 2
#define BPF_MAP_TYPE_RINGBUF 27
#define REQ_OP_MASK 0xff
#define REQ_OP_DRV_IN 34
#define MINORBITS 20

struct gendisk {
	int major;
	int first_minor;
} __attribute__((preserve_access_index));

struct request_queue {
	struct gendisk *disk;
} __attribute__((preserve_access_index));

struct request {
	struct request_queue *q;
	__u32 cmd_flags;
	sector_t __sector;
} __attribute__((preserve_access_index));

// Kernels before 5.16 kept the disk on the request itself.
struct request___old {
	struct gendisk *rq_disk;
} __attribute__((preserve_access_index));

struct event {
	__u32 dev;
	__u32 sectors;
	__u64 sector;
};

// Tracked whole-disk devices: dev (major << 20 | minor) -> 1. Filled by user space.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u32);
	__type(value, __u32);
} devices SEC(".maps");

// [0]: events dropped because the ring buffer was full; [1]: events emitted.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

// Sized by user space before load.
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4 << 20);
} events SEC(".maps");

static __always_inline void count(__u32 which)
{
	__u64 *c = bpf_map_lookup_elem(&counters, &which);
	if (c)
		__sync_fetch_and_add(c, 1);
}

SEC("tp_btf/block_rq_complete")
int BPF_PROG(on_complete, struct request *rq, int error, unsigned int nr_bytes)
{
	struct gendisk *disk;
	__u32 op = BPF_CORE_READ(rq, cmd_flags) & REQ_OP_MASK;

	if (!(op & 1))
		return 0;
	if (bpf_core_field_exists(((struct request___old *)0)->rq_disk))
		disk = BPF_CORE_READ((struct request___old *)rq, rq_disk);
	else
		disk = BPF_CORE_READ(rq, q, disk);
	if (!disk)
		return 0;
	__u32 dev = ((__u32)BPF_CORE_READ(disk, major) << MINORBITS) |
		    (__u32)BPF_CORE_READ(disk, first_minor);
	if (!bpf_map_lookup_elem(&devices, &dev))
		return 0;
	// A driver-private write (SG_IO, NVMe passthrough: REQ_OP_DRV_OUT) names no sector: it
	// cannot be placed, so it counts as lost and the disk is verify-scanned.
	if (op >= REQ_OP_DRV_IN) {
		count(0);
		return 0;
	}
	if (nr_bytes == 0)
		return 0;
	struct event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count(0);
		return 0;
	}
	e->dev = dev;
	e->sector = BPF_CORE_READ(rq, __sector);
	// A partial completion reports the bytes done at the request's current position.
	e->sectors = (nr_bytes + 511) >> 9;
	bpf_ringbuf_submit(e, 0);
	count(1);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
