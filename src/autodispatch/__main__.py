from autodispatch.cli import main

main()
