-- Budget reconciliation (bringing a namespace's grant to its Mesh's `budgets` entry) writes
-- its own transaction kind, `budget`, and counts only those: a grant made by hand
-- (`infermesh ledger grant`, kind `grant`) is never taken back by the next Mesh reconcile.
ALTER TABLE ledger_transactions DROP CONSTRAINT ledger_transactions_kind_check;
ALTER TABLE ledger_transactions ADD CONSTRAINT ledger_transactions_kind_check
    CHECK (kind IN ('charge', 'grant', 'budget', 'refund'));
-- Budget grants written before this migration carried kind `grant` and this memo.
UPDATE ledger_transactions SET kind = 'budget'
    WHERE kind = 'grant' AND memo LIKE 'budget of namespace %';
