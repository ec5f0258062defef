-- The catalog of a database as sorted text rows, for tests/db/test_schema_files.py: one block per
-- kind of object, each row (object, what it is). Built from the migrations or from
-- db/schema, a database must give the same rows. Only objects outside PostgreSQL's own
-- schemas count; public.alembic_version (Alembic's, not ours) is left out. Run with an
-- empty search_path, so every name in a definition comes with its schema.

-- name: acl_text
-- An ACL as text without the owner's name in it (grantor left out; the owner is 'owner',
-- PUBLIC 'public'), one "grantee: privileges" per grantee, sorted. Temporary: it lives in
-- this connection's pg_temp schema, which the blocks below do not read.
create function pg_temp.acl_text(p_acl aclitem[], p_owner oid) returns text
language sql stable as $$
  select case when p_acl is null then 'default' else coalesce(
    (select string_agg(g.line, '; ' order by g.line) from (
       select format('%s: %s',
                     case when e.grantee = 0 then 'public'
                          when e.grantee = p_owner then 'owner'
                          else pg_get_userbyid(e.grantee) end,
                     string_agg(e.privilege_type || case when e.is_grantable then '*' else '' end,
                                ' ' order by e.privilege_type)) as line
       from aclexplode(p_acl) e group by e.grantee) g),
    'none') end
$$;

-- name: owners
-- Who owns each object (an ACL names the owner only as 'owner'): a loaded database must
-- not hand, say, a trigger function to an API role.
select format('%s %s', o.kind, o.name), pg_get_userbyid(o.owner)
from (
  select 'schema' as kind, n.nspname as name, n.nspowner as owner
  from pg_namespace n where n.nspname <> 'information_schema' and n.nspname !~ '^pg_'
  union all
  select 'relation', n.nspname || '.' || c.relname, c.relowner
  from pg_class c join pg_namespace n on n.oid = c.relnamespace
  where n.nspname <> 'information_schema' and n.nspname !~ '^pg_'
    and c.relkind in ('r', 'p', 'v', 'm', 'f', 'S', 'c')
    and (n.nspname, c.relname) <> ('public', 'alembic_version')
  union all
  select 'function', p.oid::regprocedure::text, p.proowner
  from pg_proc p join pg_namespace n on n.oid = p.pronamespace
  where n.nspname <> 'information_schema' and n.nspname !~ '^pg_'
  union all
  select 'type', t.oid::regtype::text, t.typowner
  from pg_type t join pg_namespace n on n.oid = t.typnamespace
  where n.nspname <> 'information_schema' and n.nspname !~ '^pg_' and t.typrelid = 0
    and t.typelem = 0
) o;

-- name: column_privileges
-- Grants on single columns (grant select (a, b) on t to r): not in the table's ACL.
select n.nspname || '.' || c.relname || '.' || a.attname,
       'acl ' || pg_temp.acl_text(a.attacl, c.relowner)
from pg_attribute a
join pg_class c on c.oid = a.attrelid
join pg_namespace n on n.oid = c.relnamespace
where a.attacl is not null and a.attnum > 0 and not a.attisdropped
  and n.nspname <> 'information_schema' and n.nspname !~ '^pg_';

-- name: database_settings
-- Settings stored for this database (alter database ... set), for any role or all.
select coalesce(pg_get_userbyid(nullif(s.setrole, 0)), 'all roles'),
       array_to_string(s.setconfig, ', ')
from pg_db_role_setting s
where s.setdatabase = (select oid from pg_database where datname = current_database());

-- name: schemas
select n.nspname, 'acl ' || pg_temp.acl_text(n.nspacl, n.nspowner)
from pg_namespace n
where n.nspname <> 'information_schema' and n.nspname !~ '^pg_';

-- name: extensions
select e.extname, 'version ' || e.extversion || ' in ' || e.extnamespace::regnamespace::text
from pg_extension e;

-- name: relations
select n.nspname || '.' || c.relname,
       format('kind %s, rls %s, force rls %s, replica identity %s, persistence %s, options %s, acl %s',
              c.relkind, c.relrowsecurity, c.relforcerowsecurity, c.relreplident,
              c.relpersistence, coalesce(c.reloptions::text, 'none'),
              pg_temp.acl_text(c.relacl, c.relowner))
from pg_class c
join pg_namespace n on n.oid = c.relnamespace
where n.nspname <> 'information_schema' and n.nspname !~ '^pg_'
  and c.relkind in ('r', 'p', 'v', 'm', 'f', 'S', 'c')
  and (n.nspname, c.relname) <> ('public', 'alembic_version');

-- name: columns
-- The position counts live columns only: a column a migration dropped leaves a hole in
-- attnum that a table created whole does not have.
select n.nspname || '.' || c.relname || '.' || a.attname,
       format('#%s %s%s%s%s%s',
              row_number() over (partition by c.oid order by a.attnum),
              format_type(a.atttypid, a.atttypmod),
              case when a.attnotnull then ' not null' else '' end,
              case when a.attgenerated = '' then coalesce(' default ' || pg_get_expr(d.adbin, d.adrelid), '')
                   else format(' generated (%s) %s', pg_get_expr(d.adbin, d.adrelid), a.attgenerated) end,
              case a.attidentity when 'a' then ' generated always as identity'
                                 when 'd' then ' generated by default as identity' else '' end,
              case when a.attcollation <> 0 and a.attcollation <> t.typcollation
                   then ' collate ' || a.attcollation::regcollation::text else '' end)
from pg_attribute a
join pg_class c on c.oid = a.attrelid
join pg_namespace n on n.oid = c.relnamespace
join pg_type t on t.oid = a.atttypid
left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
where n.nspname <> 'information_schema' and n.nspname !~ '^pg_'
  and c.relkind in ('r', 'p', 'v', 'm', 'f', 'c')
  and (n.nspname, c.relname) <> ('public', 'alembic_version')
  and a.attnum > 0 and not a.attisdropped;

-- name: constraints
select n.nspname || '.' || c.relname || ' ' || k.conname, pg_get_constraintdef(k.oid, true)
from pg_constraint k
join pg_class c on c.oid = k.conrelid
join pg_namespace n on n.oid = c.relnamespace
where n.nspname <> 'information_schema' and n.nspname !~ '^pg_'
  and (n.nspname, c.relname) <> ('public', 'alembic_version');

-- name: indexes
select n.nspname || '.' || i.relname,
       pg_get_indexdef(x.indexrelid) || case when x.indisclustered then ' (clustered)' else '' end
from pg_index x
join pg_class i on i.oid = x.indexrelid
join pg_class c on c.oid = x.indrelid
join pg_namespace n on n.oid = i.relnamespace
where n.nspname <> 'information_schema' and n.nspname !~ '^pg_'
  and (n.nspname, c.relname) <> ('public', 'alembic_version');

-- name: functions
select n.nspname || '.' || p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')',
       case when p.prokind = 'a' then 'aggregate' else pg_get_functiondef(p.oid) end
       || E'\nacl ' || pg_temp.acl_text(p.proacl, p.proowner)
from pg_proc p
join pg_namespace n on n.oid = p.pronamespace
where n.nspname <> 'information_schema' and n.nspname !~ '^pg_';

-- name: triggers
select n.nspname || '.' || c.relname || ' ' || t.tgname,
       pg_get_triggerdef(t.oid, true) || ' (enabled ' || t.tgenabled::text || ')'
from pg_trigger t
join pg_class c on c.oid = t.tgrelid
join pg_namespace n on n.oid = c.relnamespace
where not t.tgisinternal
  and n.nspname <> 'information_schema' and n.nspname !~ '^pg_';

-- name: policies
select p.schemaname || '.' || p.tablename || ' ' || p.policyname,
       format('%s for %s to %s using %s with check %s', p.permissive, p.cmd, p.roles,
              coalesce('(' || p.qual || ')', 'none'), coalesce('(' || p.with_check || ')', 'none'))
from pg_policies p;

-- name: views
select n.nspname || '.' || c.relname, pg_get_viewdef(c.oid, true)
from pg_class c
join pg_namespace n on n.oid = c.relnamespace
where c.relkind in ('v', 'm')
  and n.nspname <> 'information_schema' and n.nspname !~ '^pg_';

-- name: rules
select r.schemaname || '.' || r.tablename || ' ' || r.rulename, r.definition
from pg_rules r
where r.schemaname <> 'information_schema' and r.schemaname !~ '^pg_';

-- name: sequences
-- The last value too: a migration that wrote rows with an identity moved it.
select n.nspname || '.' || c.relname,
       format('%s start %s increment %s min %s max %s cache %s cycle %s owned by %s last value %s',
              format_type(s.seqtypid, null), s.seqstart, s.seqincrement, s.seqmin, s.seqmax,
              s.seqcache, s.seqcycle,
              coalesce((select d.refobjid::regclass::text || '.' || a.attname || ' (' || d.deptype::text || ')'
                        from pg_depend d
                        join pg_attribute a on a.attrelid = d.refobjid and a.attnum = d.refobjsubid
                        where d.classid = 'pg_class'::regclass and d.objid = s.seqrelid
                          and d.refclassid = 'pg_class'::regclass and d.deptype in ('a', 'i')),
                       'nothing'),
              coalesce(pg_sequence_last_value(s.seqrelid)::text, 'none'))
from pg_sequence s
join pg_class c on c.oid = s.seqrelid
join pg_namespace n on n.oid = c.relnamespace
where n.nspname <> 'information_schema' and n.nspname !~ '^pg_';

-- name: types
-- Types of their own (a table's row type is the table's): enums, domains, ranges,
-- composites made by create type.
select n.nspname || '.' || t.typname,
       format('kind %s%s%s%s', t.typtype,
              case when t.typtype = 'e' then
                ' labels ' || (select string_agg(e.enumlabel, ', ' order by e.enumsortorder)
                               from pg_enum e where e.enumtypid = t.oid) else '' end,
              case when t.typtype = 'd' then
                ' over ' || format_type(t.typbasetype, t.typtypmod)
                || case when t.typnotnull then ' not null' else '' end
                || coalesce(' default ' || t.typdefault, '')
                || coalesce(' ' || (select string_agg(pg_get_constraintdef(k.oid, true), ' ' order by k.conname)
                                    from pg_constraint k where k.contypid = t.oid), '') else '' end,
              case when t.typtype = 'r' then
                ' of ' || (select format_type(r.rngsubtype, null) from pg_range r where r.rngtypid = t.oid)
                else '' end)
from pg_type t
join pg_namespace n on n.oid = t.typnamespace
where n.nspname <> 'information_schema' and n.nspname !~ '^pg_'
  and (t.typtype in ('e', 'd', 'r', 'm')
       or t.typtype = 'c' and (select c.relkind from pg_class c where c.oid = t.typrelid) = 'c');

-- name: default_privileges
select pg_get_userbyid(d.defaclrole) || ' in ' || coalesce(d.defaclnamespace::regnamespace::text, 'every schema')
       || ' on ' || d.defaclobjtype::text,
       pg_temp.acl_text(d.defaclacl, d.defaclrole)
from pg_default_acl d;

-- name: publications
select p.pubname,
       format('all tables %s, insert %s, update %s, delete %s, truncate %s, tables %s',
              p.puballtables, p.pubinsert, p.pubupdate, p.pubdelete, p.pubtruncate,
              coalesce((select string_agg(t.schemaname || '.' || t.tablename, ', '
                                          order by t.schemaname, t.tablename)
                        from pg_publication_tables t where t.pubname = p.pubname), 'none'))
from pg_publication p;

-- name: event_triggers
select e.evtname, format('on %s when %s run %s enabled %s', e.evtevent, e.evttags,
                         e.evtfoid::regproc::text, e.evtenabled)
from pg_event_trigger e;

-- name: comments
-- Every comment on an object made in this database (oids from 16384 are not built in).
select pg_describe_object(d.classoid, d.objoid, d.objsubid), d.description
from pg_description d
where d.objoid >= 16384;

-- name: seeded_tables
-- The tables rows are compared for (every one but Alembic's), and of each the columns
-- whose default calls a function (now(), gen_random_uuid()...): their values are the
-- time or a random id of the build, not part of the schema.
select n.nspname, c.relname,
       coalesce(array(select a.attname::text
                      from pg_attribute a
                      join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
                      where a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
                        and pg_get_expr(d.adbin, d.adrelid) ~ '\('),
                '{}')
from pg_class c
join pg_namespace n on n.oid = c.relnamespace
where n.nspname <> 'information_schema' and n.nspname !~ '^pg_'
  and c.relkind in ('r', 'p')
  and (n.nspname, c.relname) <> ('public', 'alembic_version');
