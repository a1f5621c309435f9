import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    projects: ["packages/*", "apps/*", "tests/*"],
    tags: [
      {
        name: "qemu",
        description: "needs real QEMU/NBD peers (qemu-img, qemu-nbd, nbdkit, …)",
        timeout: 60_000,
      },
    ],
    coverage: { provider: "v8", include: ["packages/*/src/**", "apps/*/src/**"] },
    restoreMocks: true,
  },
});
