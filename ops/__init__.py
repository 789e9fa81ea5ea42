"""Actions that produce no asset: registry promotion, rollback, pruning."""
