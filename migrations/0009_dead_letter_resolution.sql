-- Dead letters are resolved by operators: replayed into their projection once the cause is fixed (applied in
-- the transaction that marks them, so at most once), or discarded with a reason; both record who did it.
alter table dead_letters
    add column resolved_at     timestamptz,
    add column resolved_by     text,
    add column resolution      text check (resolution in ('replayed', 'discarded')),
    add column resolution_note text;
create index dead_letters_open on dead_letters (id) where resolved_at is null;
