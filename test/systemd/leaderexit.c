/*
 * leaderexit: the qemu suite's workload whose main thread exits alone (exit(2), not
 * exit_group(2)) while another thread runs on: /proc/<pid>/status then says State Z
 * for the process. It ignores SIGTERM, so only a kill ends it. With an argument N its
 * main thread exits N seconds after the start, otherwise at once.
 *
 * In C, built static on the host by `make systemd-test`, rather than
 * nexlet/native/testdata/leaderexit: its main thread exits within a few hundred
 * microseconds of its exec, before the native nexlet's systemd driver has systemd move
 * the new process from its holding group into its scope (seen in the VM's first runs:
 * the Go program, whose runtime starts first, did so after the move in one run of two).
 * A main thread that ended in the holding group stays there; the move takes the other
 * threads only (the case the suite is for).
 */
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

static void *run(void *arg)
{
	for (;;)
		pause();
	return arg;
}

int main(int argc, char **argv)
{
	pthread_t t;

	signal(SIGTERM, SIG_IGN);
	if (pthread_create(&t, NULL, run, NULL) != 0)
		return 1;
	if (argc > 1)
		sleep((unsigned)atoi(argv[1]));
	syscall(SYS_exit, 0); /* this thread only */
	return 0;
}
