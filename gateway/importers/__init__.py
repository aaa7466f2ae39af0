"""Importers: move a helpdesk's HTTP integrations behind the gateway (`gateway import ...`).

gorgias_api  the Gorgias REST API (list integrations, page by page; update one)
mapping      pure functions: a Gorgias integration -> a gateway entry, its env variables, new URL
files        the config merged with the operator's comments kept, the env file, the backup
gorgias      the command's steps, in the order that leaves nothing half-written
"""
