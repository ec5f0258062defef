-- name: list_flags
select key, enabled, description, updated_at from public.feature_flags order by key;

-- name: flag_by_key
select key, enabled, description, updated_at from public.feature_flags where key = %(key)s;

-- name: set_flag
select api.set_feature_flag(%(key)s, %(enabled)s);

-- name: list_workshops
select id, name from public.workshops order by name;

-- name: migration_revision
select version_num from public.alembic_version;
